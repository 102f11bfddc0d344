"""``python -m cellblock.kernel -f CONNECTION_FILE``: what the kernelspec runs."""

from ipykernel.kernelapp import IPKernelApp

from cellblock.kernel.kernel import CellblockKernel

IPKernelApp.launch_instance(kernel_class=CellblockKernel)
