"""`visionrecipe export`: write a run's model as ONNX or TorchScript, verified before it is kept.

    visionrecipe export runs/digits                               # runs/digits/model.onnx
    visionrecipe export runs/digits --format torchscript          # runs/digits/model.torchscript.pt
    visionrecipe export runs/digits --quantize dynamic            # runs/digits/model.int8.onnx
    visionrecipe export runs/digits --out deploy/digits.onnx --opset 18 --json
"""

from __future__ import annotations

import json


def cmd_export(args) -> int:
    from visionrecipe.deploy.export import export_model

    result = export_model(args.run, format=args.format, out=args.out, opset=args.opset, quantize=args.quantize,
                          data=args.data, tolerance=args.tolerance)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"verified on {result['verified_on']}: largest logit difference {result['max_abs_diff']:.2e} "
          f"(tolerance {result['tolerance'] * result['logit_scale']:.1e}), "
          f"top-1 agreement {100 * result['top1_agreement']:.2f}%")
    if result["accuracy_pytorch"] is not None:
        print(f"accuracy: PyTorch {100 * result['accuracy_pytorch']:.2f}%, "
              f"{result['format']} {100 * result['accuracy_exported']:.2f}%")
    quantized = result.get("quantized")
    if quantized:
        change = quantized["accuracy_change"]
        accuracy = ("accuracy not measured (no labelled test split)" if change is None else
                    f"accuracy {100 * quantized['accuracy']:.2f}% ({100 * change:+.2f} points vs float32)")
        print(f"int8: {accuracy}, top-1 agreement with float32 {100 * quantized['top1_agreement']:.2f}%, "
              f"size {quantized['bytes_fp32'] / 2**20:.2f} → {quantized['bytes_int8'] / 2**20:.2f} MiB")
    print(f"wrote {result['path']} ({result['bytes'] / 2**20:.2f} MiB)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a run's model to ONNX or TorchScript (verified)")
    p.add_argument("run", help="run directory")
    p.add_argument("--format", default="onnx", choices=("onnx", "torchscript"))
    p.add_argument("--out", metavar="FILE", help="output file (default RUN/model.onnx or RUN/model.torchscript.pt)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    p.add_argument("--quantize", choices=("dynamic",), help="int8 weights with onnxruntime (ONNX only)")
    p.add_argument("--data", metavar="SPEC", help="data whose test split verifies the export (default the run's)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed logit difference, times max(1, largest |logit|) (default 1e-4)")
    p.add_argument("--json", action="store_true", help="print the verification result as JSON")
    p.set_defaults(func=cmd_export)
