"""``repofs verify``, in one module per idea.

* :mod:`.checks`: the entry point, :func:`~.checks.verify_repository`, and the
  checks, one per invariant, in the order they run;
* :mod:`.result`: what verify reports (:class:`~.result.VerifyResult`, the
  shape of ``verify --json``);
* :mod:`.windows`: the objects to re-read, cut into large sequential reads;
* :mod:`.packreader`: the one thread that reads those windows with
  ``O_DIRECT`` into a few reused huge-page buffers;
* :mod:`.recordcheck`: the hot loop that checks every record of a window;
* :mod:`.damage`: each problem mapped back to the restore points, disks and
  byte ranges it harms;
* :mod:`.noindex`: what verify can still say when the index cannot be used;
* :mod:`.permissions`: files that others than the owner may read.
"""
