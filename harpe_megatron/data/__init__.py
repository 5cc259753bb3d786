"""The data pipeline: JSONL -> tokens -> length upsampling -> indexed dataset -> packed CP-split batches.

Modules (docs/data.md): ``tokenizer`` (sentencepiece behind megatron's tokenizer interface, demo training),
``jsonl`` (reading documents), ``upsample`` (Fu et al. 2024 length upsampling and its report),
``indexed`` (writing ``.bin``/``.idx``), ``dataset`` (megatron's packed GPT datasets, the
resumable sampler, batches, the CP split), ``demo`` (a small corpus from text on the machine),
``validation`` (the data and tokenizer checks run before training writes anything).
Nothing is imported here: megatron-core takes seconds to import and not every user needs it.
"""
