"""Exit statuses shared by every command, Slurm task and batch executor (see the README)."""

EXIT_OK = 0          # success; for a quadrant: processed and usable
EXIT_FAILED = 1      # failure inside the pipeline or its environment
EXIT_USAGE = 2       # bad usage or configuration
EXIT_BAD_INPUT = 3   # the input breaks the contract (the message names file and problem)
EXIT_UNUSABLE = 4    # the image is unusable (reasons in the QA record)
EXIT_RETRY = 75      # temporary failure: a retry may help (EX_TEMPFAIL)
