"""The evaluation backend: a Hugging Face causal LM and its tokenizer, loaded from a directory.

    lm = load_model("hf/llama2-7b-harpe-128k")                # AutoModelForCausalLM + AutoTokenizer
    lm = load_model("runs/harpe/checkpoints")                  # megatron checkpoint: exported first
    ids = lm.tokenizer.encode("text")                          # BOS (if the tokenizer adds one) + text
    nll = lm.token_nll(torch.tensor([ids]))                    # [1, len-1]: -log p(ids[t+1] | ids[:t+1])
    outs = lm.generate([ids_a, ids_b], max_new_tokens=32)      # greedy, batched (left padding)

Exported HARPE models carry their modeling code (``auto_map``) and load with
``trust_remote_code=True``; plain RoPE/ABF/PI/YaRN exports and stock Llama directories are
``LlamaForCausalLM``. A directory without ``config.json`` that is a megatron checkpoint (a
``torch_dist`` directory with ``metadata.json``, a trainer checkpoints directory with
``latest``, or a run directory with ``checkpoints/latest``) is exported to Hugging Face with
``megatron_harpe.convert`` first (into ``export_dir``, else a temporary directory), when that
module is installed; otherwise the error says to run ``harpe-convert megatron-to-hf``.

Scoring does not materialise the full ``[batch, seq, vocab]`` logits: for Llama-family models
(a decoder under ``get_decoder()`` and a linear output head) the final hidden states are put
through the head ``logit_chunk`` positions at a time, in fp32, so 128k-token documents fit in
memory. Other architectures fall back to ``model(input_ids).logits``.
"""
from __future__ import annotations

import atexit
import bisect
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from megatron_harpe.evaluation.errors import EvalError

__all__ = ["EvalTokenizer", "HFTokenizer", "ProjectTokenizer", "LoadedModel", "load_model", "resolve_model_dir",
           "is_megatron_checkpoint", "exporter_available", "load_tokenizer_for_eval"]


# ----------------------------------------------------------------------------- tokenizers


class EvalTokenizer:
    """What the evaluation needs from a tokenizer.

    ``encode(text)`` = the tokens the model reads for ``text`` as a whole input: the tokenizer's
    own leading special tokens (BOS for Llama) followed by the text's tokens, never a trailing
    EOS. ``token_index_at(text, chars)`` maps character offsets of ``text`` to token indices of
    ``encode(text)``: the number of tokens that end at or before the offset (so a needle that
    starts at character c starts at that token).
    """

    name: str = ""
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    pad_id: Optional[int] = None
    prefix: List[int] = []

    def encode_plain(self, text: str) -> List[int]:
        raise NotImplementedError

    def encode(self, text: str) -> List[int]:
        return list(self.prefix) + self.encode_plain(text)

    def count(self, text: str) -> int:
        return len(self.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def offsets(self, text: str) -> Optional[List[tuple]]:
        """Character spans of ``encode_plain(text)``'s tokens, or None when the tokenizer cannot tell."""
        return None

    def token_index_at(self, text: str, chars: Sequence[int]) -> List[int]:
        spans = self.offsets(text)
        if spans is None:  # slow tokenizers: count the tokens of each prefix
            return [len(self.prefix) + len(self.encode_plain(text[:c])) if c > 0 else len(self.prefix)
                    for c in chars]
        ends = [e for _, e in spans]
        # token ends are non-decreasing for the tokenizers we know; sort defensively
        if any(ends[i] > ends[i + 1] for i in range(len(ends) - 1)):
            ends = sorted(ends)
        return [len(self.prefix) + bisect.bisect_right(ends, c) for c in chars]

    def describe(self) -> Dict[str, Any]:
        return {"tokenizer": self.name, "bos_id": self.bos_id, "eos_id": self.eos_id}


class HFTokenizer(EvalTokenizer):
    """A ``transformers`` tokenizer (AutoTokenizer)."""

    def __init__(self, tok, name: str):
        self.tok = tok
        self.name = name
        try:  # no "sequence longer than the model's maximum" warnings: long inputs are the point here
            tok.model_max_length = 1 << 40
        except Exception:  # pragma: no cover - read-only on some tokenizer classes
            pass
        self.bos_id = tok.bos_token_id
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id
        # the leading special tokens the tokenizer adds to a whole input (BOS for Llama-2/3)
        probe = "a"
        with_special = list(tok(probe, add_special_tokens=True)["input_ids"])
        plain = list(tok(probe, add_special_tokens=False)["input_ids"])
        start = _find_sub(with_special, plain)
        self.prefix = with_special[:start] if start >= 0 else []
        self._fast = bool(getattr(tok, "is_fast", False))

    def encode_plain(self, text: str) -> List[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def offsets(self, text: str) -> Optional[List[tuple]]:
        if not self._fast:
            return None
        try:
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        except (NotImplementedError, ValueError, TypeError):
            return None
        return [tuple(o) for o in enc["offset_mapping"]]


class ProjectTokenizer(EvalTokenizer):
    """A megatron-harpe tokenizer (sentencepiece ``tokenizer.model`` or ``tokenizer.json``); BOS is
    prepended when the tokenizer has one."""

    def __init__(self, tok):
        self.tok = tok
        self.name = f"{tok.kind}:{tok.path}"
        self.bos_id = tok.bos
        self.eos_id = tok.eod
        self.pad_id = tok.pad_id
        self.prefix = [tok.bos] if tok.bos is not None else []

    def encode_plain(self, text: str) -> List[int]:
        return list(self.tok.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        special = {self.bos_id, self.eos_id}
        return self.tok.decode([i for i in ids if i not in special])


def _find_sub(seq: List[int], sub: List[int]) -> int:
    if not sub:
        return len(seq)
    for i in range(len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    return -1


def load_tokenizer_for_eval(model_dir: Optional[str | Path], tokenizer: Optional[str | Path] = None,
                            tokenizer_type: Optional[str] = None) -> EvalTokenizer:
    """The model directory's own tokenizer (AutoTokenizer), or ``tokenizer`` when given: a HF tokenizer
    directory (AutoTokenizer), or with ``tokenizer_type`` (sentencepiece | huggingface) a file read by
    megatron-harpe's own loader."""
    if tokenizer is not None and tokenizer_type:
        from megatron_harpe.data.tokenizer import TokenizerError, load_tokenizer

        try:
            return ProjectTokenizer(load_tokenizer(tokenizer_type, str(tokenizer)))
        except TokenizerError as err:
            raise EvalError(f"--tokenizer {tokenizer}: {err}") from None
    source = Path(tokenizer) if tokenizer is not None else Path(model_dir)
    if not source.exists():
        raise EvalError(f"--tokenizer {source} does not exist")
    if source.is_file():
        kind = "huggingface" if source.suffix == ".json" else "sentencepiece"
        return load_tokenizer_for_eval(None, source, kind)
    has_files = any((source / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                                                     "vocab.json"))
    if not has_files:
        raise EvalError(f"{source} holds no tokenizer (tokenizer.json / tokenizer.model / tokenizer_config.json); "
                        f"pass --tokenizer DIR_OR_FILE (and --tokenizer-type for a tokenizer.model or tokenizer.json)")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise EvalError("evaluation needs transformers: pip install 'megatron-harpe[hf]'") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=True, local_files_only=True)
    except Exception as err:  # transformers raises OSError/ValueError/KeyError for broken directories
        raise EvalError(f"cannot load the tokenizer of {source} with AutoTokenizer: {type(err).__name__}: {err}; "
                        f"pass --tokenizer FILE --tokenizer-type sentencepiece|huggingface") from None
    return HFTokenizer(tok, str(Path(source).resolve()) if tokenizer is not None else "the model's own")


# ----------------------------------------------------------------------------- model directories


def is_megatron_checkpoint(path: Path) -> bool:
    """A torch_dist checkpoint, a trainer checkpoints directory (``latest``) or a run directory."""
    return (path / "metadata.json").is_file() or (path / "latest").is_file() \
        or (path / "checkpoints" / "latest").is_file()


def exporter_available() -> bool:
    """Whether megatron_harpe.convert (the Megatron -> HF exporter) is installed."""
    try:
        return importlib.util.find_spec("megatron_harpe.convert.megatron_to_hf") is not None
    except (ImportError, ValueError):
        return False


def resolve_model_dir(model: str | Path, *, export_dir: Optional[str | Path] = None,
                      tokenizer: Optional[str | Path] = None, show_progress: bool = True) -> Path:
    """The Hugging Face directory to load for ``--model``: the directory itself when it has a
    config.json; for a megatron checkpoint, its export (see the module docstring)."""
    path = Path(model)
    if not path.exists():
        raise EvalError(f"--model {path} does not exist")
    if path.is_file():
        raise EvalError(f"--model {path} is a file; give a Hugging Face model directory (config.json + weights)")
    if (path / "config.json").is_file():
        return path
    if not is_megatron_checkpoint(path):
        raise EvalError(f"--model {path} has no config.json: not a Hugging Face model directory (config.json + "
                        f"*.safetensors), nor a megatron checkpoint (metadata.json, 'latest' or checkpoints/latest)")
    if not exporter_available():
        raise EvalError(f"--model {path} is a megatron checkpoint and this installation has no exporter "
                        f"(megatron_harpe.convert): run `harpe-convert megatron-to-hf --load {path} --out HF_DIR` "
                        f"and pass --model HF_DIR")
    if export_dir is not None:
        out = Path(export_dir)
        marker = out / ".harpe-eval-source"
        if (out / "config.json").is_file() and marker.is_file() and marker.read_text().strip() == str(path.resolve()):
            print(f"harpe-eval: reusing the export of {path} in {out}", file=sys.stderr)
            return out
    else:
        tmp = tempfile.mkdtemp(prefix="harpe-eval-export-")
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        out = Path(tmp) / "hf"
    print(f"harpe-eval: {path} is a megatron checkpoint; exporting it to Hugging Face in {out} (harpe-convert "
          f"megatron-to-hf)", file=sys.stderr, flush=True)
    # in a child process: the export runs megatron-core (on CPU, with the CPU backend's adaptations), which this
    # process, about to run the model with transformers (on a GPU if there is one), should not inherit
    cmd = [sys.executable, "-m", "megatron_harpe.convert.cli", "megatron-to-hf", "--load", str(path), "--out",
           str(out), "--overwrite"]
    if tokenizer is not None:
        cmd += ["--tokenizer", str(tokenizer)]
    if not show_progress:
        cmd.append("--no-progress")
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise EvalError(f"--model {path}: the export to Hugging Face failed ({tail}); run `harpe-convert "
                        f"megatron-to-hf --load {path} --out HF_DIR` to see why, then pass --model HF_DIR")
    if proc.stdout.strip():
        print(proc.stdout.strip().splitlines()[-1], file=sys.stderr)
    (out / ".harpe-eval-source").write_text(str(path.resolve()) + "\n")
    return out


# ----------------------------------------------------------------------------- the loaded model


def _parse_dtype(name: str, device: str):
    import torch

    if name in (None, "", "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise EvalError(f"--dtype {name!r}: expected auto, fp32, bf16 or fp16")
    return table[name]


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


class LoadedModel:
    """A causal LM ready for scoring and greedy generation. The weights load on first use (``model``), so a
    finished sweep re-run only to rebuild its tables never loads them."""

    def __init__(self, model, tokenizer: EvalTokenizer, path: str, source: str, device: str, dtype,
                 config: Optional[Dict[str, Any]] = None, loader=None, logit_chunk: int = 4096):
        self._model = model
        self._loader = loader
        self.tokenizer = tokenizer
        self.path = path
        self.source = source
        self.device = device
        self.dtype = dtype
        self.config = config or {}
        self.logit_chunk = logit_chunk

    @property
    def model(self):
        if self._model is None:
            self._model = self._loader()
        return self._model

    @property
    def loaded(self) -> bool:
        return self._model is not None

    # --- identity (what a result file records and checks on resume)
    def describe(self) -> Dict[str, Any]:
        cfg = self.config
        info = {"model": self.source, "model_type": cfg.get("model_type"),
                "architecture": (cfg.get("architectures") or [None])[0], "dtype": _dtype_name(self.dtype),
                "max_position_embeddings": cfg.get("max_position_embeddings"),
                "rope_theta": cfg.get("rope_theta"), "rope_scaling": cfg.get("rope_scaling"),
                "rope_parameters": cfg.get("rope_parameters")}
        if cfg.get("harpe_bases") is not None:
            info["harpe_bases"] = cfg.get("harpe_bases")
        info.update(self.tokenizer.describe())
        return info

    @property
    def max_position_embeddings(self) -> Optional[int]:
        return self.config.get("max_position_embeddings")

    def check_lengths(self, lengths: Sequence[int], what: str) -> None:
        """A note (not an error) when lengths exceed the model's max_position_embeddings: extrapolation is measured
        too (the paper evaluates the 4k base model at 128k)."""
        limit = self.max_position_embeddings
        if limit and max(lengths) > int(limit):
            print(f"harpe-eval {what}: note: lengths up to {max(lengths)} exceed the model's max_position_embeddings "
                  f"({limit}): measuring extrapolation", file=sys.stderr)

    # --- scoring
    def _chunked_head(self):
        model = self.model
        get_decoder = getattr(model, "get_decoder", None)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        cfg = getattr(model, "config", None)
        special = any(getattr(cfg, k, None) not in (None, 1.0) for k in
                      ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"))
        if get_decoder is None or head is None or special:
            return None
        try:
            decoder = get_decoder()
        except Exception:  # pragma: no cover
            return None
        import torch

        if decoder is None or decoder is model or not isinstance(head, torch.nn.Linear):
            return None
        return decoder, head

    def token_nll(self, input_ids, attention_mask=None):
        """``[batch, seq-1]`` fp32 negative log-likelihoods of ``input_ids[:, 1:]`` (each token given all before it)."""
        import torch

        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        targets = input_ids[:, 1:]
        with torch.inference_mode():
            parts = self._chunked_head()
            if parts is None:
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
            decoder, head = parts
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            out = []
            for start in range(0, hidden.shape[1] - 1, self.logit_chunk):
                stop = min(start + self.logit_chunk, hidden.shape[1] - 1)
                logits = head(hidden[:, start:stop]).float()
                logp = torch.log_softmax(logits, dim=-1)
                out.append(-logp.gather(-1, targets[:, start:stop].unsqueeze(-1)).squeeze(-1))
            return torch.cat(out, dim=1).cpu()

    # --- generation
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> List[str]:
        """Greedy continuations of token-id prompts (left-padded into one batch); the new text of each."""
        import torch

        if not prompts:
            return []
        pad = self.tokenizer.pad_id
        if pad is None:
            pad = self.tokenizer.eos_id if self.tokenizer.eos_id is not None else 0
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), int(pad), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
        kwargs = dict(max_new_tokens=int(max_new_tokens), do_sample=False, num_beams=1, pad_token_id=int(pad))
        if self.tokenizer.eos_id is not None:
            kwargs["eos_token_id"] = int(self.tokenizer.eos_id)
        with torch.inference_mode(), warnings.catch_warnings(), _quiet_transformers():
            warnings.simplefilter("ignore")  # generation-config notes; lengths past the model's maximum are on purpose
            gen_cfg = _greedy_config(self.model, kwargs)
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      generation_config=gen_cfg) if gen_cfg is not None else \
                self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        new = out[:, width:].cpu().tolist()
        texts = []
        for row in new:
            if self.tokenizer.eos_id is not None and self.tokenizer.eos_id in row:
                row = row[:row.index(self.tokenizer.eos_id)]
            texts.append(self.tokenizer.decode(row))
        return texts


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' logger at error level (its reminders about lengths past max_position_embeddings repeat what
    check_lengths already said once)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _greedy_config(model, kwargs):
    """A fresh GenerationConfig for greedy decoding (a model's own config may ask for sampling)."""
    try:
        from transformers import GenerationConfig
    except ImportError:  # pragma: no cover
        return None
    base = getattr(model, "generation_config", None)
    cfg = GenerationConfig(**kwargs)
    if base is not None:  # keep what the model needs besides the decoding strategy
        for name in ("bos_token_id", "decoder_start_token_id"):
            if getattr(base, name, None) is not None:
                setattr(cfg, name, getattr(base, name))
    return cfg


def load_model(model: str | Path, *, tokenizer: Optional[str | Path] = None, tokenizer_type: Optional[str] = None,
               device: str = "auto", dtype: str = "auto", attn_implementation: Optional[str] = None,
               export_dir: Optional[str | Path] = None, trust_remote_code: bool = True,
               show_progress: bool = True, lazy: bool = False) -> LoadedModel:
    """Load ``model`` (a HF directory, or a megatron checkpoint through the exporter) for evaluation; with
    ``lazy`` the weights load on first use."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise EvalError("evaluation needs transformers: pip install 'megatron-harpe[hf]'") from None
    hf_dir = resolve_model_dir(model, export_dir=export_dir, tokenizer=tokenizer, show_progress=show_progress)
    try:
        config = json.loads((hf_dir / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise EvalError(f"{hf_dir / 'config.json'} is not readable JSON: {err}") from None
    if not isinstance(config, dict) or not config.get("model_type") and not config.get("architectures"):
        raise EvalError(f"{hf_dir / 'config.json'} names no model_type/architectures: not a transformers model config")
    tok = load_tokenizer_for_eval(hf_dir, tokenizer, tokenizer_type)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = _parse_dtype(dtype, device)
    kwargs: Dict[str, Any] = dict(trust_remote_code=trust_remote_code, local_files_only=True)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation

    def loader():
        if not show_progress:
            try:
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
            except ImportError:  # pragma: no cover
                pass
        try:
            try:  # transformers >= 4.56 calls it dtype, older versions torch_dtype
                hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch_dtype, **kwargs)
            except TypeError:
                hf_model = AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch_dtype, **kwargs)
        except (OSError, ValueError, KeyError, ImportError) as err:
            raise EvalError(f"cannot load {hf_dir} with AutoModelForCausalLM: {type(err).__name__}: {err}") from None
        hf_model.to(device).eval()
        if getattr(hf_model.config, "pad_token_id", None) is None and tok.eos_id is not None:
            hf_model.config.pad_token_id = tok.eos_id
        return hf_model

    source = str(Path(model).resolve())
    lm = LoadedModel(None, tok, str(hf_dir), source, device, torch_dtype, config, loader=loader)
    if not lazy:
        lm.model  # noqa: B018 - load now
    return lm
