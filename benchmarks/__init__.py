"""Benchmarks and kernel tooling: what measures or checks the toolkit, never what runs in an edit.

- commands.py: the `invedit bench` command (subcommand `kernel`);
- kernel_bench.py: the attention kernel timed against every SDPA backend (interpreter smoke set
  without a GPU);
- kernel_static.py: the ptxas compile sweep of the kernel's block configs, which writes the
  autotune record shipped as kernels/data/autotune.json;
- triton_interpret.py: runs the kernel under TRITON_INTERPRET=1 in a child process (tests, bench);
- attention_reference.py: plain fp32/fp64 attention, the oracle of the kernel tests and the bench;
- unet_bench.py: one UNet step against diffusers; common.py: its timing and result-file helpers.

Every benchmark writes its results where the user asks (`--out`, default the current directory);
benchmarks/results/ holds the runs this repository records.
"""
