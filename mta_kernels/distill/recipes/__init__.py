"""Published training settings as recipe files (``<name>.json`` in this directory), read by
:mod:`mta_kernels.distill.recipe`."""
