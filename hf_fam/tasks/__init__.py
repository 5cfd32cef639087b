"""Tasks shared by training, evaluation and the demo: passkey retrieval, synthetic or in natural filler (passkey).

A task's examples label their tokens as transformers' losses expect: `IGNORE_INDEX` marks a position the loss
skips (the prompt; padding, in the training collator).
"""

IGNORE_INDEX = -100
