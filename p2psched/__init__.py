"""p2psched: a peer-to-peer job scheduler for AI and HPC clusters."""

__version__ = "0.1.0"
