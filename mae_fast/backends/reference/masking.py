"""random_masking: the reference (two stable argsorts)."""

from mae_fast import dispatch, reference
from mae_fast.backends.reference._support import SUPPORT

dispatch.register("random_masking", "reference", SUPPORT)(reference.random_masking)
