"""slm: OPT from scratch, SFT on ToolBench tool calls, offline ToolBench evaluation.

Install torch first (`pip install torch==2.13.0`, or your CUDA build): a bare `torch` requirement
otherwise pulls the newest CUDA wheels. Then `pip install -e ".[test]"` (BFCL's scorer: `pip install -e
".[test,bfcl]" && pip install --no-deps bfcl-eval==2026.3.23`).

`slm` is the only import name the project installs. The top-level kernels/ folder is `slm.kernels`
(Hugging Face's `kernels` package, which transformers needs, owns the name `kernels`): a checkout finds it
through slm/kernels/__init__.py, and a wheel gets a copy of its modules under slm/kernels/ (BuildPy below).
data/ runs from the repository root (`python -m data.prepare`) and is not installed.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    """Copies kernels/*.py into the build's slm/kernels/ (not for an editable install, which reads the checkout)."""

    def run(self):
        super().run()
        if not self.editable_mode:
            target = Path(self.build_lib) / "slm" / "kernels"
            for module in sorted(Path("kernels").glob("*.py")):
                self.copy_file(str(module), str(target / module.name))


setup(
    name="slm",
    version="0.1.0",
    description="Small language models for agentic tool calling: OPT-350M SFT on ToolBench",
    python_requires=">=3.10",
    packages=["slm", "slm.toolbench", "slm.kernels", "slm.serve"],
    cmdclass={"build_py": BuildPy},
    install_requires=[
        "torch>=2.4",
        "tokenizers>=0.19",
        "numpy",
        "safetensors>=0.4",
        "tqdm",
        "matplotlib",   # loss.png and pass_rate.png (slm/plots.py)
        "starlette", "uvicorn",   # python -m slm.serve
        "llguidance",             # slm.step_grammar: tool calls valid by construction
        "triton==3.6.0; platform_system == 'Linux' and platform_machine == 'x86_64'",  # the GPU machine's version
    ],
    # "kernels" is Hugging Face's package (transformers >= 5.25 needs it): tests/test_import_name.py runs beside it.
    # "bfcl" is what bfcl_eval's checker imports; bfcl-eval itself goes in with --no-deps (README, BFCL):
    # its own requirements pin numpy==1.26.4 and pull every provider SDK, faiss and sentence-transformers.
    extras_require={"test": ["pytest", "transformers>=4.40", "kernels", "openai", "jsonschema"],
                    "bfcl": ["tree_sitter==0.21.3", "tree-sitter-java==0.21.0", "tree-sitter-javascript==0.21.4",
                             "tenacity", "filelock", "python-dotenv", "overrides", "pandas", "requests", "openai"]},
)
