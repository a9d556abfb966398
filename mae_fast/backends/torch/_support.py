"""The one support declaration of the torch backend: every device and float dtype, every input differentiated."""

from mae_fast import dispatch

SUPPORT = dispatch.Support(kernel="the torch backend")
