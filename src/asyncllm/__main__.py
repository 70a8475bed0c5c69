"""`python -m asyncllm` runs the command-line interface."""

from asyncllm.cli import main

raise SystemExit(main())
