"""Blend variants bench/blend.py can measure (`--variants NAME ...`): Blender keyword arguments by name (issue #18)."""

from __future__ import annotations

from kvshelf.blend.selection import SelectionPolicy

# Blend variants measured for issue #18 (deliverable 2), by name: Blender keyword arguments.
VARIANTS = {
    "15%, first 8 tokens of each document": {"ratios": [0.15], "selection": SelectionPolicy(head_tokens=8)},
    "15%, first 32 tokens of each document": {"ratios": [0.15], "selection": SelectionPolicy(head_tokens=32)},
    "15%, budget per document": {"ratios": [0.15], "selection": SelectionPolicy(per_document=True)},
    "15%, K deviation only": {"ratios": [0.15], "selection": SelectionPolicy(signal="k")},
    "15%, V deviation only": {"ratios": [0.15], "selection": SelectionPolicy(signal="v")},
    "15%, check layer 3": {"check_layers": [3], "ratios": [0.15]},
    "15%, check layers 1 (30%) and 3 (15%)": {"check_layers": [1, 3], "ratios": [0.3, 0.15]},
    "15%, check layers 1 (30%) and 5 (15%)": {"check_layers": [1, 5], "ratios": [0.3, 0.15]},
    "20%, check layers 1 (40%) and 5 (20%)": {"check_layers": [1, 5], "ratios": [0.4, 0.2]},
    # issue #18, third session: question-aware selection (kvshelf.blend.selection's question signals)
    "15%, question attention": {"ratios": [0.15], "selection": SelectionPolicy(signal="question")},
    "15%, question attention, span 8": {
        "ratios": [0.15],
        "selection": SelectionPolicy(signal="question", question_span=8),
    },
    "15%, KV x question": {"ratios": [0.15], "selection": SelectionPolicy(signal="kv+question")},
    "15%, KV x question (weight 4)": {
        "ratios": [0.15],
        "selection": SelectionPolicy(signal="kv+question", question_weight=4.0),
    },
    "15%, KV x question, span 8": {
        "ratios": [0.15],
        "selection": SelectionPolicy(signal="kv+question", question_span=8),
    },
    "15%, question pass": {
        "ratios": [0.15],
        "selection": SelectionPolicy(signal="question", question_pass=True),
    },
    "15%, question pass, span 8": {
        "ratios": [0.15],
        "selection": SelectionPolicy(signal="question", question_pass=True, question_span=8),
    },
    "15%, KV x question pass": {
        "ratios": [0.15],
        "selection": SelectionPolicy(signal="kv+question", question_pass=True),
    },
    "15%, KV x question pass (weight 4)": {
        "ratios": [0.15],
        "selection": SelectionPolicy(signal="kv+question", question_pass=True, question_weight=4.0),
    },
    "12%, question pass": {"ratios": [0.12], "selection": SelectionPolicy(signal="question", question_pass=True)},
    # issue #18, fifth session: documents cached with the KV of the earlier prompt that held them
    "15%, from the earlier prompt": {"ratios": [0.15], "document_context": "prompt"},
    "30%, from the earlier prompt": {"ratios": [0.3], "document_context": "prompt"},
    "0%, from the earlier prompt": {"ratios": [0.0], "document_context": "prompt"},
    # ninth session: lower ratios for 4-8K prompts (a fixed share of layers runs in full whatever the ratio)
    "10%, from the earlier prompt": {"ratios": [0.1], "document_context": "prompt"},
    "7%, from the earlier prompt": {"ratios": [0.07], "document_context": "prompt"},
    # the defaults since the ninth session: 15% of the first 2,048 placed tokens, a quarter of that past them
    "15% to 2,048 tokens then 3.75%, from the earlier prompt": {
        "ratios": [0.15],
        "document_context": "prompt",
        "ratio_tokens": 2048,
        "beyond_share": 0.25,
    },
    "15% to 2,048 tokens then 3.75%, question pass, from the earlier prompt": {
        "ratios": [0.15],
        "selection": SelectionPolicy(signal="question", question_pass=True),
        "document_context": "prompt",
        "ratio_tokens": 2048,
        "beyond_share": 0.25,
    },
    # tenth session (h18): the question pass at the long-prompt budget, part of the budget by K and V deviation
    "15% to 2,048 tokens then 3.75%, question pass, half by deviation, from the earlier prompt": {
        "ratios": [0.15],
        "selection": SelectionPolicy(signal="question", question_pass=True, question_budget=0.5),
        "document_context": "prompt",
        "ratio_tokens": 2048,
        "beyond_share": 0.25,
    },
    "15% to 2,048 tokens then 3.75%, question pass, 70% by question, from the earlier prompt": {
        "ratios": [0.15],
        "selection": SelectionPolicy(signal="question", question_pass=True, question_budget=0.7),
        "document_context": "prompt",
        "ratio_tokens": 2048,
        "beyond_share": 0.25,
    },
    # the same through the blender's long-prompt policy (blend_long_question_pass): the question pass past 2,048
    # placed tokens only, the default selection below them
    "default, long prompts by the question pass, half by deviation": {
        "ratios": [0.15],
        "document_context": "prompt",
        "ratio_tokens": 2048,
        "beyond_share": 0.25,
        "long_selection": SelectionPolicy(signal="question", question_pass=True, question_budget=0.5),
    },
    "default, long prompts by the question pass": {
        "ratios": [0.15],
        "document_context": "prompt",
        "ratio_tokens": 2048,
        "beyond_share": 0.25,
        "long_selection": SelectionPolicy(signal="question", question_pass=True),
    },
    # eleventh session (h18): more of the long-prompt budget past 2,048 placed tokens (the speed headroom)
    # ("..., 6% past 2,048" is the config default since then; "default, long prompts by the question pass" keeps
    # the tenth session's 3.75%)
    **{
        f"default, long prompts by the question pass, {share * 15:g}% past 2,048": {
            "ratios": [0.15],
            "document_context": "prompt",
            "ratio_tokens": 2048,
            "beyond_share": share,
            "long_selection": SelectionPolicy(signal="question", question_pass=True),
        }
        for share in (0.4, 0.5, 0.6)
    },
    "12%, question pass, from the earlier prompt": {
        "ratios": [0.12],
        "selection": SelectionPolicy(signal="question", question_pass=True),
        "document_context": "prompt",
    },
    "15%, question pass, from the earlier prompt": {
        "ratios": [0.15],
        "selection": SelectionPolicy(signal="question", question_pass=True),
        "document_context": "prompt",
    },
    "20%, question pass": {"ratios": [0.2], "selection": SelectionPolicy(signal="question", question_pass=True)},
    "15%, question pass, global layers": {
        "ratios": [0.15],
        "selection": SelectionPolicy(signal="question", question_pass=True, question_layers="global"),
    },
    "15%, question pass, max over layers": {
        "ratios": [0.15],
        "selection": SelectionPolicy(signal="question", question_pass=True, question_reduce="max"),
    },
    "15%, KV x question pass, by document (weight 4)": {
        "ratios": [0.15],
        "selection": SelectionPolicy(
            signal="kv+question", question_pass=True, question_by_document=True, question_weight=4.0
        ),
    },
    "15%, question pass, half by deviation": {
        "ratios": [0.15],
        "selection": SelectionPolicy(signal="question", question_pass=True, question_budget=0.5),
    },
    "15%, question pass, 70% by question": {
        "ratios": [0.15],
        "selection": SelectionPolicy(signal="question", question_pass=True, question_budget=0.7),
    },
    "12%, question pass, 70% by question": {
        "ratios": [0.12],
        "selection": SelectionPolicy(signal="question", question_pass=True, question_budget=0.7),
    },
    "12%, question pass, half by deviation": {
        "ratios": [0.12],
        "selection": SelectionPolicy(signal="question", question_pass=True, question_budget=0.5),
    },
    "15%, documents behind the instruction": {"ratios": [0.15], "prefix_documents": 1},
    "15%, per document, first 8 tokens": {
        "ratios": [0.15],
        "selection": SelectionPolicy(per_document=True, head_tokens=8),
    },
    # issue #18, fourth session: APE-style reweighting of the question's attention (kvshelf.model.reweight)
    "15%, context mass 1.5 (global layers)": {"ratios": [0.15], "context_attention": (1.0, 1.5, "global")},
    "15%, context T 0.9, mass 1.5 (global layers)": {"ratios": [0.15], "context_attention": (0.9, 1.5, "global")},
    "15%, earlier documents +0.5 (global layers)": {
        "ratios": [0.15],
        "context_attention": (1.0, 1.0, "global"),
        "context_distance_bias": 0.5,
    },
    "15%, earlier documents +0.75 (global layers)": {
        "ratios": [0.15],
        "context_attention": (1.0, 1.0, "global"),
        "context_distance_bias": 0.75,
    },
    "12%, earlier documents +0.5 (global layers)": {
        "ratios": [0.12],
        "context_attention": (1.0, 1.0, "global"),
        "context_distance_bias": 0.5,
    },
}
