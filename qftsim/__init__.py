"""qftsim: quantize for a specific integer accelerator, simulate bit-exactly, compile with TVM."""

from qftsim.errors import QftsimError
from qftsim.profile import HardwareProfile, load_profile, list_profiles

__all__ = ["QftsimError", "HardwareProfile", "load_profile", "list_profiles"]
__version__ = "0.1.0"
