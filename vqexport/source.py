"""The model a build starts from: a local Hugging Face causal-LM directory, and the VQ-Logits head beside it.

    DIR/config.json                             transformers' config (any architecture it loads as a causal LM)
    DIR/model.safetensors                       or model.safetensors.index.json + its shards (never pickles)
    DIR/tokenizer.json, tokenizer_config.json   optional; every id must fit the vocabulary
    DIR/vq_head.json + DIR/vq_head.safetensors  the head (vqexport.head.spec); absent = a dense model

Everything is validated here, before any work starts, and every problem is one line. Nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import VQExportError
from .graph_io import cache_shape
from .head.spec import CONFIG_FILE as HEAD_CONFIG_FILE
from .head.spec import WEIGHTS_FILE as HEAD_WEIGHTS_FILE
from .head.spec import Head, read_head
from .jsonfile import read_json_object
from .safetensors_io import read_header

DEMO_NAME = "demo"
CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
# Files of a model directory a build, a conversion or onnxruntime-genai uses besides the weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
EXTRA_FILES = ("generation_config.json",)


@dataclass(frozen=True)
class Geometry:
    """What the graph and its KV cache look like, from transformers' config of the model.

    ``n_kv_heads`` / ``head_dim`` are the first layer's. ``kv_shapes`` holds the cache shape of each layer that keeps
    keys and values of its own, in order: the graph's ``past_key_values.{i}``; (n_kv_heads, head_dim), or
    (n_kv_heads, key_dim, value_dim) where the values have a size of their own (``graph_io.cache_dims``). Most models
    give every layer the same shape (the default); Gemma 4 gives its global layers a head size of their own, and its
    last ``num_kv_shared_layers`` read an earlier layer's keys and values and keep none. Multi-head latent attention
    (DeepSeek-V3, MiniCPM3) caches its compressed latent as one head of ``kv_lora_rank`` "keys" and its rotary
    part as one head of ``qk_rope_head_dim`` "values", as transformers keeps them. ``logit_softcap``: the model's
    logits are ``cap * tanh(l / cap)`` of its output layer's ``l`` (Gemma 2 and 4), and the head's get the same."""

    model_type: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_position: int
    tie_word_embeddings: bool
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    kv_shapes: tuple[tuple[int, ...], ...] = ()  # () = every layer (n_kv_heads, head_dim)
    logit_softcap: float | None = None  # final_logit_softcapping: logits = cap * tanh(output layer / cap)

    def __post_init__(self):
        if not self.kv_shapes:
            object.__setattr__(self, "kv_shapes", ((self.n_kv_heads, self.head_dim),) * self.n_layers)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def kv_layers(self) -> int:
        """How many layers keep a cache: the graph's past_key_values.{i}, i < kv_layers."""
        return len(self.kv_shapes)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["kv_shapes"] = [list(s) for s in self.kv_shapes]
        return d


@dataclass
class Source:
    path: Path
    geometry: Geometry
    weight_files: tuple[Path, ...]
    head: Head | None = None
    tokenizer_path: Path | None = None
    config: dict = field(default_factory=dict)  # config.json as written

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model_type(self) -> str:
        return self.geometry.model_type

    def files(self) -> list[Path]:
        """Every file that defines this model (config, weights, index, tokenizer, head), in a fixed order."""
        names = [CONFIG, INDEX, *TOKENIZER_FILES, *EXTRA_FILES, HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE]
        out = [self.path / n for n in names if (self.path / n).is_file()]
        return sorted(set(out) | set(self.weight_files))

    def copy_tokenizer(self, out: Path) -> None:
        """The model's tokenizer files, as they are, into an artifact directory (what an app needs for text)."""
        if self.tokenizer_path is None:
            return
        for name in TOKENIZER_FILES:
            if (self.path / name).is_file():
                (out / name).write_bytes((self.path / name).read_bytes())


def demo_dir() -> Path:
    """The embedded default model shipped inside the package."""
    from importlib import resources

    return Path(str(resources.files("vqexport") / "data" / DEMO_NAME))


def is_demo(path: Path) -> bool:
    return Path(path).resolve() == demo_dir().resolve()


def model_dir(model) -> Path:
    """``"demo"`` -> the embedded model's directory; anything else -> that path."""
    return demo_dir() if str(model) == DEMO_NAME else Path(model)


def resolve_source(model, need_head: bool = True) -> Source:
    """``None`` or ``"demo"`` -> the embedded model; anything else -> a model directory."""
    return load_source(demo_dir() if model is None else model_dir(model), need_head=need_head)


def load_source(path, need_head: bool = True, read_heads: bool = True) -> Source:
    """Read and validate a model directory. ``need_head``: a VQ-Logits head must be beside it; ``read_heads`` False:
    any head files are ignored (a conversion replaces them)."""
    path = Path(path)
    if not path.exists():
        raise VQExportError(f"{path}: model directory does not exist")
    if not path.is_dir():
        raise VQExportError(f"{path}: not a directory; give a Hugging Face model directory (config.json, model.safetensors)")
    raw = _read_config(path)
    weights = weight_files(path)
    geometry = read_geometry(path, raw)
    head = read_head(path) if read_heads else None
    if need_head and head is None:
        raise VQExportError(f"{path}: no VQ-Logits head ({HEAD_CONFIG_FILE} + {HEAD_WEIGHTS_FILE}); "
                            f"make one with 'vqexport convert --from {path} --codebook-size K --out DIR'")
    if head is not None:
        hc = head.config
        if hc.vocab_size != geometry.vocab_size:
            raise VQExportError(f"{path / HEAD_CONFIG_FILE}: the head has vocab_size {hc.vocab_size}, the model's config "
                                f"says {geometry.vocab_size}")
        if hc.hidden_size != geometry.hidden_size:
            raise VQExportError(f"{path / HEAD_CONFIG_FILE}: the head has hidden_size {hc.hidden_size}, the model's config "
                                f"says {geometry.hidden_size}")
    tok = path / TOKENIZER
    tokenizer_path = tok if tok.is_file() else None
    if tokenizer_path is not None:
        check_tokenizer(tokenizer_path, geometry.vocab_size)
    return Source(path=path, geometry=geometry, weight_files=tuple(weights), head=head, tokenizer_path=tokenizer_path, config=raw)


def _read_config(path: Path) -> dict:
    f = path / CONFIG
    if not f.is_file():
        raise VQExportError(f"{path}: no {CONFIG}; a model directory needs config.json and model.safetensors")
    raw = read_json_object(f)
    if not isinstance(raw.get("model_type"), str):
        if {"d_model", "n_layers", "head"} <= set(raw):
            raise VQExportError(f"{f}: a checkpoint in vqexport's earlier format (d_model, n_layers, head), no longer "
                                "read; give the Hugging Face model it came from to vqexport convert")
        raise VQExportError(f"{f}: not a Hugging Face config (no model_type)")
    return raw


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory: one file, or every shard its index names (all present)."""
    single, index = path / SINGLE, path / INDEX
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
            if not names or not all(isinstance(n, str) and "/" not in n and "\\" not in n for n in names):
                raise ValueError
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            raise VQExportError(f"{index}: malformed shard index (needs a weight_map of tensor -> shard file)") from None
        files = [path / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise VQExportError(f"{path}: shard(s) {', '.join(missing)} listed in {INDEX} are missing")
    elif any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise VQExportError(f"{path}: only safetensors weights are read (no pickled .bin / .pt files); "
                            "convert them with transformers' save_pretrained(safe_serialization=True)")
    else:
        raise VQExportError(f"{path}: no {SINGLE} and no {INDEX}")
    for f in files:
        read_header(f)  # a truncated or foreign file is named here, before any model is loaded
    return files


def hf_config(path: Path):
    """transformers' config object of a model directory (its text part for a multimodal one); one line on failure."""
    import transformers
    from transformers import AutoConfig

    from .quiet import quiet

    try:
        with quiet():
            cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # whatever a config's validation raises (ValueError, KeyError, huggingface_hub's checks, ...)
        msg = " ".join(ln.strip() for ln in str(e).strip().splitlines()[:2]) or type(e).__name__  # a heading, then what
        raise VQExportError(f"{path}: transformers {transformers.__version__} cannot load this config ({_shortened(msg)})") from None
    return cfg


def _shortened(msg: str, limit: int = 300) -> str:
    """``msg`` cut to at most ``limit`` characters at the end of a sentence, else of a word (marked with ...)."""
    if len(msg) <= limit:
        return msg
    cut = msg[: limit + 1]
    end = cut.rfind(". ")
    if end > limit // 3:
        return cut[: end + 1]
    cut = msg[: limit - 4]
    return (cut[: cut.rfind(" ")].rstrip(",;:") if " " in cut else cut) + " ..."


def check_causal_lm(cfg, path: Path) -> None:
    """transformers must have a causal-LM class for ``cfg`` (checked by name: no modeling code is imported)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise VQExportError(f"{path}: architecture {cfg.model_type!r} is not a causal language model in transformers "
                            f"{transformers.__version__} (AutoModelForCausalLM has no class for {type(cfg).__name__})")


def causal_lm_class(cfg, path: Path):
    """The transformers class that loads ``cfg`` as a causal LM, or one line saying it has none."""
    from transformers import AutoModelForCausalLM

    check_causal_lm(cfg, path)
    return AutoModelForCausalLM._model_mapping[type(cfg)]


def _token_ids(value) -> tuple[int, ...]:
    return tuple(int(e) for e in (value if isinstance(value, (list, tuple)) else [value])) if value is not None else ()


def _generation_eos(path: Path) -> tuple[int, ...]:
    """The end-of-sequence ids of generation_config.json, which transformers' generate stops at (an instruct model's
    end of turn often is only there: Qwen2.5-Instruct's <|im_end|> beside <|endoftext|>, Llama 3.1's <|eot_id|>)."""
    f = path / "generation_config.json"
    try:
        raw = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
        return _token_ids(raw.get("eos_token_id")) if isinstance(raw, dict) else ()
    except (OSError, ValueError, TypeError):
        raise VQExportError(f"{f}: not a JSON object with integer eos_token_id(s)") from None


def read_geometry(path: Path, raw: dict) -> Geometry:
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if raw["model_type"] not in CONFIG_MAPPING_NAMES:  # AutoConfig's own message says so in a paragraph
        raise VQExportError(f"{path}: transformers {transformers.__version__} does not know the architecture "
                            f"{raw['model_type']!r} (config.json's model_type): a newer transformers may, or the "
                            "model_type is misspelt")
    cfg = hf_config(path)
    check_causal_lm(cfg, path)
    text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg

    def get(name, default=None):
        try:
            v = getattr(text, name, None)
        except RuntimeError as e:  # transformers 5's per-layer configs refuse a global read of what varies by layer
            if type(e).__name__ != "AmbiguousGlobalPerLayerAttributeError":
                raise
            v = getattr(text.per_layer_config[0], name, None)  # the first layer's; kv_shapes has every layer's
        return default if v is None else v

    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads") if get(k) is None]
    if missing:  # Mamba, RWKV: no attention heads, so no keys and values to carry
        raise VQExportError(f"{path / CONFIG}: the {raw['model_type']} config has no {' / '.join(missing)}; vqexport "
                            "exports decoders with attention heads and a key/value cache")
    try:
        d, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        for name, v in (("hidden_size", d), ("num_attention_heads", heads), ("vocab_size", int(get("vocab_size"))),
                        ("num_hidden_layers", int(get("num_hidden_layers")))):
            if v < 1:
                raise ValueError(f"{name} = {v}")
        eos = _token_ids(get("eos_token_id")) + _generation_eos(path)  # chat models list their turn ends there too
        eos = tuple(dict.fromkeys(eos))
        softcap = float(get("final_logit_softcapping", 0.0))
        if softcap < 0:
            raise ValueError(f"final_logit_softcapping = {softcap:g}")
        n_layers, n_kv = int(get("num_hidden_layers")), int(get("num_key_value_heads", heads))
        if get("new_decoder_architecture") is not None:  # Falcon's cache: one head when multi-query in its first form;
            n_kv = 1 if get("multi_query", True) and not get("new_decoder_architecture") else heads  # else keys broadcast to all
        head_dim = int(get("head_dim", d // heads))
        geo = Geometry(
            model_type=str(raw["model_type"]), vocab_size=int(get("vocab_size")), hidden_size=d,
            n_layers=n_layers, n_heads=heads, n_kv_heads=n_kv, head_dim=head_dim,
            max_position=int(get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False)),
            bos_token_id=_token(get("bos_token_id")), eos_token_ids=eos, pad_token_id=_token(get("pad_token_id")),
            kv_shapes=_kv_shapes(text, n_layers, n_kv, head_dim, int(get("num_kv_shared_layers", 0)), path / CONFIG,
                                 latent=(get("kv_lora_rank"), get("qk_rope_head_dim")), value_dim=get("v_head_dim")),
            logit_softcap=softcap or None,
        )
    except (TypeError, ValueError) as e:
        raise VQExportError(f"{path / CONFIG}: cannot read the model's sizes ({e})") from None
    V = geo.vocab_size
    fix = {}
    for name in ("bos_token_id", "pad_token_id"):  # special ids outside the vocabulary cannot be used: dropped
        v = getattr(geo, name)
        if v is not None and not 0 <= v < V:
            fix[name] = None
    if any(not 0 <= e < V for e in geo.eos_token_ids):
        fix["eos_token_ids"] = tuple(e for e in geo.eos_token_ids if 0 <= e < V)
    if fix:
        import dataclasses

        geo = dataclasses.replace(geo, **fix)
    return geo


def _kv_shapes(text, n_layers: int, n_kv: int, head_dim: int, shared: int, where: Path, latent=(None, None),
               value_dim=None) -> tuple[tuple[int, ...], ...]:
    """The cache shape of each layer that keeps its own keys and values: all but the last ``shared``
    (``num_kv_shared_layers``: Gemma 3n, Gemma 4), each from transformers 5's per-layer config where it has one.
    ``latent``: (kv_lora_rank, qk_rope_head_dim) of multi-head latent attention, whose cache is its latent (one head
    of each); ``value_dim``: values of a head size other than the keys' (``v_head_dim``)."""
    if not 0 <= shared < n_layers:
        raise VQExportError(f"{where}: num_kv_shared_layers = {shared} leaves no layer of the {n_layers} that keeps keys "
                            "and values of its own")
    if None not in latent:
        return (cache_shape(1, int(latent[0]), int(latent[1])),) * (n_layers - shared)
    layers = getattr(text, "per_layer_config", None)
    shapes = []
    for i in range(n_layers - shared):
        layer = layers[i] if layers is not None else None
        heads, size = getattr(layer, "num_key_value_heads", None), getattr(layer, "head_dim", None)
        size = head_dim if size is None else int(size)
        shapes.append(cache_shape(n_kv if heads is None else int(heads), size, size if value_dim is None else int(value_dim)))
    return tuple(shapes)


def _token(v):
    if isinstance(v, (list, tuple)):
        v = v[0] if v else None
    return int(v) if v is not None else None


def check_tokenizer(path: Path, vocab_size: int) -> None:
    """The tokenizer must parse and every id it can produce must be a row of the model's vocabulary."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise VQExportError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    n = tok.get_vocab_size(with_added_tokens=True)
    top = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    if max(n, top) > vocab_size:
        raise VQExportError(
            f"{path}: tokenizer has {max(n, top)} tokens but the model's vocab_size is {vocab_size}; "
            "use the tokenizer the model was trained with"
        )
