"""A reconstruction of a DeepSpeed run loads with DeepSpeed's own ``load_checkpoint`` and stays modelled.

DeepSpeed keeps fp32 master copies of the weights in its optimizer state (ZeRO partitions, or the model states'
``optimizer`` entry with bf16/fp16) and puts them back into the module at the first optimizer step. This script
trains a small network with a real DeepSpeed engine on the CPU (gloo, ``--ranks`` processes), saves a checkpoint
per epoch, runs ``cmdtool ingest``, ``decompose`` and ``reconstruct --epoch 6``, loads the reconstruction with
``engine.load_checkpoint`` and takes one optimizer step at learning rate 0: the module must still hold the
modelled weights (those of ``reconstruct --format pt``), not the source's.

    python examples/deepspeed_roundtrip.py --zero 2 --ranks 2 --out runs/ds
    python examples/deepspeed_roundtrip.py --zero 0 --bf16 --out runs/ds

It needs DeepSpeed, which is not a dependency of cmdtool (``make deepspeed-roundtrip`` builds a venv with it).
Exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

EPOCHS, EPOCH = 12, 6


def engine(zero: int, bf16: bool, world: int):
    import deepspeed
    import torch

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    config = {"train_batch_size": 4 * world, "train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": bf16},
              "optimizer": {"type": "Adam", "params": {"lr": 0.01, "torch_adam": True}},
              "zero_optimization": {"stage": zero}}
    return deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)[0]


def step(ds_engine, x, y=None):
    import torch

    dtype = next(ds_engine.module.parameters()).dtype
    out = ds_engine(x.to(dtype)).float()
    loss = out.sum() if y is None else torch.nn.functional.cross_entropy(out, y)
    ds_engine.backward(loss)
    ds_engine.step()


def rank_main(args) -> None:
    """One rank: ``train`` saves a checkpoint per epoch; ``load`` loads the reconstruction and checks it."""
    import torch

    ds_engine = engine(args.zero, args.bf16, int(os.environ["WORLD_SIZE"]))
    torch.manual_seed(1)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    if args.rank_task == "train":
        for epoch in range(1, EPOCHS + 1):
            for i in range(0, 64, 4):
                step(ds_engine, x[i:i + 4], y[i:i + 4])
            ds_engine.save_checkpoint(str(args.out / "ckpts"), tag=f"global_step{epoch}")
        return
    ds_engine.load_checkpoint(str(args.out / "recon"), tag=f"cmd_default_epoch{EPOCH}")
    bare = torch.load(args.out / "bare.pt", weights_only=True)
    loaded = {k: v.clone() for k, v in ds_engine.module.state_dict().items()}
    for group in ds_engine.optimizer.param_groups:
        group["lr"] = 0.0
    step(ds_engine, x[:4])
    stepped = ds_engine.module.state_dict()
    result = {"rank": int(os.environ["RANK"]),
              "loaded_is_modelled": all(torch.equal(loaded[k], bare[k]) for k in bare),
              "after_a_step_is_modelled": all(torch.equal(stepped[k], bare[k]) for k in bare)}
    print("RESULT " + json.dumps(result), flush=True)


def run_ranks(args, task: str) -> list[str]:
    outputs, processes = [], []
    for rank in range(args.ranks):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.ranks),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
        command = [sys.executable, __file__, "--rank-task", task, "--zero", str(args.zero), "--out", str(args.out)]
        command += ["--bf16"] if args.bf16 else []
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
    for process in processes:
        output = process.communicate()[0]
        if process.returncode:
            sys.exit(f"a {task} rank failed:\n{output[-3000:]}")
        outputs.append(output)
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zero", type=int, default=2, choices=(0, 1, 2), help="ZeRO stage")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    parser.add_argument("--ranks", type=int, default=1, help="data-parallel processes")
    parser.add_argument("--port", type=int, default=29571)
    parser.add_argument("--out", type=Path, default=Path("runs/deepspeed"))
    parser.add_argument("--rank-task", choices=("train", "load"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_task:
        return rank_main(args)
    marker = args.out / ".deepspeed-roundtrip"
    if args.out.exists() and any(args.out.iterdir()) and not marker.exists():
        sys.exit(f"{args.out} holds files this script did not write: name an empty or new folder")
    shutil.rmtree(args.out, ignore_errors=True)  # only a folder this script made (its marker)
    args.out.mkdir(parents=True)
    marker.touch()
    run_ranks(args, "train")
    cmdtool = [str(Path(sys.executable).with_name("cmdtool"))]
    store = ["--store", str(args.out / "run.zarr")]
    for command in (["ingest", str(args.out / "ckpts"), "-q"], ["decompose", "--modes", "3", "-q"],
                    ["reconstruct", "--epoch", str(EPOCH), "-o", str(args.out / "recon")],
                    ["reconstruct", "--epoch", str(EPOCH), "--format", "pt", "-o", str(args.out / "bare.pt")]):
        subprocess.run(cmdtool + command + store, check=True)
    results = [json.loads(line[len("RESULT "):]) for output in run_ranks(args, "load")
               for line in output.splitlines() if line.startswith("RESULT ")]
    setting = f"ZeRO {args.zero}, {'bf16' if args.bf16 else 'fp32'}, {args.ranks} rank(s)"
    ok = len(results) == args.ranks and all(r["loaded_is_modelled"] and r["after_a_step_is_modelled"]
                                            for r in results)
    print(f"{setting}: {'ok' if ok else 'FAILED'} {results}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
