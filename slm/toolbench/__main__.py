"""`python -m slm.toolbench show FILE --tokenizer DIR`: see show.py."""

from slm.toolbench.show import main

main()
