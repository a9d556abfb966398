"""The one support declaration of the reference backend: everything (it is the specification)."""

from mae_fast import dispatch

SUPPORT = dispatch.Support(kernel="the reference")
