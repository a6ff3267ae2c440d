"""slm: OPT from scratch, SFT on ToolBench tool calls, offline ToolBench evaluation.

Install torch first (`pip install torch==2.13.0`, or your CUDA build): a bare `torch` requirement
otherwise pulls the newest CUDA wheels. Then `pip install -e ".[test]"`.
"""

from setuptools import setup

setup(
    name="slm",
    version="0.1.0",
    description="Small language models for agentic tool calling: OPT-350M SFT on ToolBench",
    python_requires=">=3.10",
    packages=["slm", "kernels"],
    install_requires=[
        "torch>=2.4",
        "tokenizers>=0.19",
        "numpy",
        "safetensors>=0.4",
        "tqdm",
        "matplotlib",   # evaluate.py's pass_rate.png
        "triton==3.6.0; platform_system == 'Linux' and platform_machine == 'x86_64'",  # the GPU machine's version
    ],
    extras_require={"test": ["pytest", "transformers>=4.40"]},
)
