"""The ONNX a TensorRT engine is built from: the fp32 export, sanitized with onnx-graphsurgeon.

torch's dynamo export carries hundreds of `Constant` nodes and arithmetic on them; folding them
leaves TensorRT's parser a smaller graph (tiny FLUX: 1717 -> 1023 nodes). Shape folding is off:
onnx-graphsurgeon 0.6's breaks the export's repeat_interleave (ONNX Runtime then refuses the
graph). What is *not* folded: the initializers (the model's weights, named exactly like the
torch parameters). Folding `Transpose(weight)` would turn a weight into a new, unnamed
constant and the engine could no longer be refit by name with a new adapter; so the weights are
hidden from the folder as graph inputs and put back afterwards.

    <cache>/onnx/<fp32 export key>-trt/transformer.onnx (+ .data, + transformer.json)

Same inputs, same outputs, same weight names as the export it came from (tests/edge/
test_trt_onnx.py checks all three on ONNX Runtime through polygraphy).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from blockskip.edge.onnx_export import ONNX_FILE, SIDECAR, _replace_dir, read_sidecar
from blockskip.errors import ConfigError, NotAvailableError

logger = logging.getLogger(__name__)

SUFFIX = "-trt"


def prepare_for_tensorrt(onnx_path: str | Path, out_dir: str | Path) -> Path:
    """Fold constants and drop dead nodes of an fp32 export, keeping every initializer by name;
    write it (external data) with its sidecar to `out_dir`."""
    try:
        import onnx
        import onnx_graphsurgeon as gs
    except ImportError as err:
        raise NotAvailableError("onnx-graphsurgeon is needed to prepare ONNX for TensorRT: "
                                "pip install 'dit-blockskip[edge]'") from err
    src = Path(onnx_path)
    meta = read_sidecar(src)
    if meta["precision"] not in ("fp32", "fp16"):
        raise ConfigError(f"TensorRT engines are built from an fp32 or fp16 export; {src} is {meta['precision']}")
    model = onnx.load(str(src))
    weights = list(model.graph.initializer)
    names = {w.name for w in weights}
    hidden = [onnx.helper.make_tensor_value_info(w.name, w.data_type, list(w.dims)) for w in weights]
    del model.graph.initializer[:]
    model.graph.input.extend(hidden)  # weights as inputs: the folder leaves them (and their names) alone
    graph = gs.import_onnx(model)
    before = len(graph.nodes)
    # fold_shapes=False: graphsurgeon 0.6's shape folding rewrites the dynamo export's
    # repeat_interleave Reshape into one ONNX Runtime rejects ("incompatible shapes")
    graph.fold_constants(fold_shapes=False).cleanup().toposort()
    prepared = gs.export_onnx(graph)
    kept = [i for i in prepared.graph.input if i.name not in names]
    del prepared.graph.input[:]
    prepared.graph.input.extend(kept)
    used = {name for node in prepared.graph.node for name in node.input}
    prepared.graph.initializer.extend(w for w in weights if w.name in used)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    onnx.save(prepared, str(tmp / ONNX_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
              location=ONNX_FILE + ".data", size_threshold=1024)  # folded shape constants stay inline
    onnx.checker.check_model(str(tmp / ONNX_FILE))
    meta.update(prepared_for="tensorrt", prepared_from=src.parent.name,
                nodes={"before": before, "after": len(prepared.graph.node)})
    (tmp / SIDECAR).write_text(json.dumps(meta, indent=2))
    _replace_dir(tmp, out)
    logger.info("prepared %s for TensorRT: %d -> %d nodes", src.parent.name, before, len(prepared.graph.node))
    return out / ONNX_FILE


def cached_trt_onnx(onnx_path: str | Path) -> Path:
    """The prepared copy of an export, next to it in the cache (made once per export)."""
    src = Path(onnx_path)
    target = src.parent.with_name(src.parent.name + SUFFIX)
    if (target / ONNX_FILE).is_file() and (target / SIDECAR).is_file():
        return target / ONNX_FILE
    return prepare_for_tensorrt(src, target)
