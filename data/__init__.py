"""Data preparation scripts: `python data/prepare.py` turns ToolBench files into token shards."""
