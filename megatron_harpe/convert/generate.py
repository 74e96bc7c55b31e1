"""The demo's last step: export a trained run to Hugging Face and generate from it with transformers."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from megatron_harpe.convert.errors import ConversionError


def export_and_generate(run_dir: str | Path, tokenizer: Optional[str | Path] = None,
                        prompt: str = "The passkey is", *, out_dir: Optional[str | Path] = None,
                        max_new_tokens: int = 32, verify: bool = True) -> Dict[str, Any]:
    """Export the newest checkpoint of `run_dir` to `out_dir` (default <run_dir>/hf), load it with
    `AutoModelForCausalLM(..., trust_remote_code=True)` and `AutoTokenizer`, and continue `prompt`
    greedily. Prints the conversion summary and the completion; returns
    {"hf_dir", "prompt", "completion", "new_token_ids", "summary"}.

    `run_dir`: a harpe-train run directory (checkpoints/latest), its checkpoints directory, or a
    checkpoint. `tokenizer`: the run's tokenizer (sentencepiece tokenizer.model, tokenizer.json
    or a HF tokenizer directory); None = what the run config names.
    """
    from megatron_harpe.convert.hf_runtime import hf_greedy, load_hf_causal_lm
    from megatron_harpe.convert.megatron_to_hf import convert_megatron_to_hf

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "hf"
    summary = convert_megatron_to_hf(run_dir, out_dir, tokenizer=tokenizer, overwrite=True, show_progress=False,
                                     verify=verify)
    print(summary.line(), flush=True)
    if not (out_dir / "tokenizer_config.json").is_file():
        raise ConversionError(f"{out_dir} has no tokenizer; pass the run's tokenizer to export_and_generate")
    from transformers import AutoTokenizer

    model = load_hf_causal_lm(out_dir)
    # trust_remote_code: AutoTokenizer reads config.json first, and a HARPE config's auto_map is remote code
    tok = AutoTokenizer.from_pretrained(str(out_dir), local_files_only=True, trust_remote_code=True)
    input_ids = tok(prompt, return_tensors="pt").input_ids
    generated = hf_greedy(model, input_ids, max_new_tokens)
    new_ids = generated[0, input_ids.shape[1]:].tolist()
    completion = tok.decode(new_ids, skip_special_tokens=True)
    print(f"generation ({type(model).__name__} from {out_dir}, greedy, {len(new_ids)} tokens):\n"
          f"  {prompt!r} -> {completion!r}", flush=True)
    return {"hf_dir": str(out_dir), "prompt": prompt, "completion": completion, "new_token_ids": new_ids,
            "summary": summary}
