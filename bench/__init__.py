"""The bench: timing harness, contenders, results, traces. Installed as megakernel.bench
(a source checkout mounts it under that name too, see megakernel/__init__.py).

    harness.py         timing primitives (CUDA events, L2 flush, copy bandwidth), the stamp
    baselines.py       eager / CUDA graph / torch.compile (child process) / megakernel
    tp_baseline.py     tensor-parallel PyTorch over N GPUs (NCCL), eager and CUDA graphs
    compile_worker.py  the torch.compile child
    report.py          derived numbers; JSON, markdown table, PNG bar chart (torch-free)
    trace.py           a traced step -> Perfetto JSON, Gantt PNG, per-opcode table (torch-free)
Entry points: `python -m megakernel bench` and `python -m megakernel trace`; the device run
of both is bench/device_bench.sh. Importing this package imports nothing else.
"""
