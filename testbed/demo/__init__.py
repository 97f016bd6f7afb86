"""The demo and its report: ``run`` (``kgpu demo`` and ``kgpu bench
stack``: stack.sh in a guest or on a host, and its progress), ``stack.sh``
(the whole stack: gpu-crypt and gpu-raid6 beside stock dm-crypt and md,
under the fio jobs of ``jobs/``, each verified), ``bench`` (the sweep's
points and the guest script of ``kgpu testbed bench``), ``fio`` (fio's
JSON, read with the standard library), ``report`` (the verdict, the plots
and the markdown report). ``example/`` holds stored results.

May import the harness below it; not the command line above it, and
nothing of kgpu_helper.
"""
