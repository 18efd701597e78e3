"""The project's own VMM and guest side, for tests, fuzzing and benchmarks: not the product.

Nothing in the daemon imports this package; only the test suite, ``bench/`` and the VM
harness do. It plays the parts the daemon serves, so that a test can send exactly the
requests it chooses, malformed ones included, without QEMU or a guest kernel:

* :mod:`.frontend`: a vhost-user front-end (:class:`~.frontend.Frontend`), guest RAM in a
  memfd (:class:`~.frontend.GuestRam`) and the driver half of split virtqueues
  (:class:`~.frontend.DriverQueue`), as QEMU and a guest's virtio driver would hold them;
* :mod:`.dax_window`: the VMM's half of a DAX window, serving SHMEM_MAP / SHMEM_UNMAP on the
  back-end channel;
* :mod:`.fuse_client`: the kernel's side of FUSE in miniature (build requests, read replies);
* :mod:`.testdevice`: a trivial virtio device for the vhost-user layer without FUSE, and
  ``python -m pyvirtiofsd.testing.testdevice SOCKET`` to serve it.
"""
