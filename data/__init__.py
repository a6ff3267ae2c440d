"""Data preparation, run from the repository root (or as scripts once the project is installed):

    python -m data.synthetic --out DIR      # offline tool-calling tasks in ToolBench's format
    python -m data.prepare --input FILE --tokenizer DIR --out SHARDS   # ToolBench files -> token shards
"""
