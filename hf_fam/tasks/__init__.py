"""Tasks shared by training, evaluation and the demo: passkey retrieval, synthetic or in natural filler (passkey).

A task's examples label their tokens as transformers' losses expect: `IGNORE_INDEX` marks a position the loss
skips (the prompt; padding, in the training collator). This module imports nothing: the training options
(hf_fam/training/options.py) read `PASSKEY_FORMS` from here when `hf-fam finetune --help` builds its options.
"""

IGNORE_INDEX = -100
# the passkey task's forms: in words for any tokenizer, or the synthetic 33-token form for tiny models
PASSKEY_FORMS = ("text", "synthetic")
# Landmark Attention's filler (epfml/landmark-attention, llama/run_test.py), one sentence per entry; also the
# plain sentences `hf-fam finetune` starts the memory's content slots from (training/options.py)
PASSKEY_FILLER = (" The grass is green.", " The sky is blue.", " The sun is yellow.", " Here we go.",
                  " There and back again.")
