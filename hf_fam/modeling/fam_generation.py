"""Generation modes a FAM model cannot run, refused with one line before any token is produced.

A FAM model's state is recurrent: after every block, each layer's memory has absorbed the block, and the
`FAMCache` cannot be rolled back to an earlier token. Modes that score candidate tokens and then undo the ones
they reject need that roll-back:

- assisted / speculative decoding (`assistant_model`, `prompt_lookup_num_tokens`, `assistant_early_exit`,
  `use_mtp`): transformers' ASSISTED_GENERATION mode, which crops the cache after verifying a draft;
- contrastive search (`penalty_alpha` with `top_k > 1`): scores `top_k` candidates through the cache and keeps
  one (transformers 5.24 runs it from the Hub repo `transformers-community/contrastive-search`);
- continuous batching (`cache_implementation="paged"`, `generate_batch`, `init_continuous_batching`): a paged
  KV cache holds keys and values per token, not a per-block recurrent memory; transformers 5.24 logs the error
  and returns no tokens, so it is refused here.

Greedy search, sampling, beam search and beam sampling run unchanged (the cache reorders its rows for beams).
`FAMGenerationMixin` puts the checks on a model class; `check_generation_mode` is the check itself.

This file ships with every converted checkpoint: it imports only torch and transformers.
"""

from __future__ import annotations

from transformers.generation.configuration_utils import GenerationMode

WHY = "a FAM model's memory absorbs every block and cannot be rolled back to an earlier token"
USE_INSTEAD = "use greedy search, sampling or beam search"

# mode -> what the user set to get it
REFUSED_MODES = {
    GenerationMode.ASSISTED_GENERATION:
        "assisted / speculative decoding (assistant_model, prompt_lookup_num_tokens, assistant_early_exit, use_mtp)",
    GenerationMode.CONTRASTIVE_SEARCH: "contrastive search (penalty_alpha with top_k > 1)",
}


def unsupported_generation_error(generation_mode) -> str | None:
    """The one-line message refusing `generation_mode` (a `GenerationMode` or its string), or None if it runs."""
    try:
        mode = GenerationMode(generation_mode)
    except ValueError:
        return None
    what = REFUSED_MODES.get(mode)
    if what is None:
        return None
    return f"FAM models do not support {what}: {WHY}; {USE_INSTEAD}."


def check_generation_mode(generation_mode) -> None:
    """Raise a one-line ValueError if a FAM model cannot run `generation_mode`."""
    message = unsupported_generation_error(generation_mode)
    if message is not None:
        raise ValueError(message)


def continuous_batching_error() -> str:
    return ("FAM models do not support continuous batching (cache_implementation='paged', generate_batch): a paged "
            "KV cache cannot hold a FAM model's per-block recurrent memory; call generate() on a padded batch.")


class FAMGenerationMixin:
    """Put before `GenerationMixin` in a FAM model's bases: refuses the modes above at the start of `generate`.

    `generate` computes the mode from the generation config and then calls `_get_deprecated_gen_repo` (which
    would fetch contrastive search from the Hub) and `_validate_generation_mode`; both check the mode first.
    """

    def _get_deprecated_gen_repo(self, generation_mode, *args, **kwargs):
        check_generation_mode(generation_mode)
        return super()._get_deprecated_gen_repo(generation_mode, *args, **kwargs)

    def _validate_generation_mode(self, generation_mode, *args, **kwargs):
        check_generation_mode(generation_mode)
        return super()._validate_generation_mode(generation_mode, *args, **kwargs)

    def init_continuous_batching(self, *args, **kwargs):
        raise ValueError(continuous_batching_error())


__all__ = ["FAMGenerationMixin", "check_generation_mode", "continuous_batching_error", "unsupported_generation_error"]
