"""qvlq-mini: a small Qwen-VL and the synthetic multimodal task suite it is trained and scored on.

* :mod:`qvlq.mini.tasks`: the task suite (scenes, six question types, exact answers, scoring, writers).
* :mod:`qvlq.mini.vocab`: the mini byte-level BPE (``qwen.tiktoken`` format, official pre-split regex).
* :mod:`qvlq.mini.model`: ``mini_config``: the exact Qwen-VL architecture at a trainable size.
* :mod:`qvlq.mini.train`: ``qvlq train-mini``: answer-only training on chat-exact renderings, written
  in the official checkpoint layout with a ``train_log.json``.
* :mod:`qvlq.mini.evaluate`: ``qvlq eval-tasks``: greedy per-task accuracy with bootstrap intervals.
"""
