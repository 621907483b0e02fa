"""`fakeprint export CKPT --onnx MODEL.onnx`: ONNX export with a parity check against PyTorch."""

from __future__ import annotations

import argparse


def _cmd_export(args: argparse.Namespace) -> int:
    from fakeprint.core.errors import FakeprintError
    from fakeprint.engine.onnx import export_onnx
    from fakeprint.engine.onnx_routed import export_routed_onnx
    from fakeprint.models.ensemble_file import is_ensemble_path

    if not args.onnx:
        raise FakeprintError("say where to write the model: fakeprint export CKPT --onnx MODEL.onnx")
    if not args.tolerance > 0:
        raise FakeprintError(f"--tolerance must be positive, got {args.tolerance}")
    export = export_routed_onnx if is_ensemble_path(args.checkpoint) else export_onnx
    r = export(args.checkpoint, args.onnx, opset=args.opset, tolerance=args.tolerance, n_images=args.parity_images)
    print(f"wrote {r.onnx_path} and {r.metadata_path} in {r.seconds:.1f}s "
          f"(parity on {r.parity_images} images: max |p_onnx - p_torch| = {r.max_abs_diff:.2e}, "
          f"tolerance {args.tolerance:g})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "export", help="export a checkpoint to ONNX (uint8 NHWC input, parity-checked against PyTorch)",
        description="Export a checkpoint to ONNX. The graph takes uint8 N x 100 x 100 x 3 RGB images (normalisation "
                    "inside) and returns logits and probs; MODEL.onnx.json beside it records classes, normalisation "
                    "and the source checkpoint. Nothing is written unless PyTorch and onnxruntime agree.")
    s.add_argument("checkpoint", help="a run folder, NAME.safetensors or its stem (or a shipped model: default, accurate, "
                                      "fast, robust), or a routed ensemble (routed, NAME.ensemble.json): one graph")
    s.add_argument("--onnx", metavar="MODEL.onnx", help="the ONNX file to write")
    s.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    s.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed absolute difference of any class probability (default 1e-4)")
    s.add_argument("--parity-images", type=int, default=16, help="images in the parity batch (default 16)")
    s.set_defaults(fn=_cmd_export)
