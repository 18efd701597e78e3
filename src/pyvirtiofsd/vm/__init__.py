"""A throwaway Linux guest under QEMU for end-to-end tests, benchmarks and demos.

from pyvirtiofsd.vm import FsDevice, run_guest
result = run_guest("mount -t virtiofs share /mnt && ls /mnt", [FsDevice(sock, "share")])
"""

from pyvirtiofsd.vm.assets import AssetsMissing, missing_assets
from pyvirtiofsd.vm.guest import FsDevice, GuestError, GuestResult, GuestTimeout, run_guest

__all__ = [
    "AssetsMissing",
    "FsDevice",
    "GuestError",
    "GuestResult",
    "GuestTimeout",
    "missing_assets",
    "run_guest",
]
