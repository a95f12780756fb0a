"""Convert a published EDM (NVlabs/edm, ``network-snapshot-*.pkl`` / ``edm-*.pkl``) or EDM2 (NVlabs/edm2,
``edm2-*.pkl``) checkpoint into an fdistill model directory (config.json + model.safetensors), without running the
code the pickle carries.

    python scripts/convert_edm.py edm-cifar10-32x32-cond-vp.pkl models/edm-cifar10-cond
    python scripts/convert_edm.py edm2-img64-s-1073741-0.075.pkl models/edm2-img64-s
    fdistill sample --model models/edm-cifar10-cond --num 16 --out samples

How it stays safe: the published pickles store every network object through NVIDIA's ``torch_utils.persistence``
as the *source code* of its module (a string), its class name, its constructor arguments and its state; a plain
``pickle.load`` would ``exec`` that source. This script unpickles with ``fdistill.edm.checkpoint.SafeUnpickler``,
whose ``find_class`` answers only a fixed table of globals: the persistence call becomes plain data (class name +
state; the source string is never read), PyTorch containers become plain state holders, tensors are rebuilt by
PyTorch's tensor rebuild functions from storages read with ``torch.load(weights_only=True)``. Any other global (e.g.
``os.system``) aborts with an error naming it. From the data it keeps the constructor arguments and the tensors,
builds fdistill's own implementation of the network (``fdistill.edm``) and loads the tensors into it, strictly.
Exit status: 0 converted, 2 the file is not a supported checkpoint (one line on stderr says why).
"""
from __future__ import annotations

import argparse
import pickle
import sys

from fdistill.edm.checkpoint import convert_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="the published .pkl file")
    parser.add_argument("out", help="model directory to write (config.json + model.safetensors)")
    parser.add_argument("--key", default="ema", help="entry of the pickled dict holding the network (default: ema)")
    args = parser.parse_args(argv)
    try:
        out = convert_checkpoint(args.checkpoint, args.out, key=args.key)
    except (FileNotFoundError, EOFError, pickle.UnpicklingError, ValueError) as error:
        print(f"convert_edm: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
