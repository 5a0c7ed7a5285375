"""The ``python -m nattn`` command line: ``profile`` (one problem, nattn backends), ``bench``
(named problems against SDPA and FlexAttention, with speed-of-light bounds) and ``sol`` (the
speed-of-light table of one problem). See docs/performance.md."""
