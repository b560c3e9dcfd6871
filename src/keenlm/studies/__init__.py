"""Studies: measured answers to "which technique pays off at my scale?" (``keenlm study NAME OUT``).

Each study trains and measures the models it compares and writes ``results.json``,
``results.md`` and charts into its output folder; stopped, it resumes where it stopped
(keenlm.studies.common). One module per study, except law2, which holds the two halves of the
second scaling law in training (``epochs`` and ``group``):

    frontier   bits vs quality of quantization-aware training at several sizes
    ptq        one model quantized by several post-training recipes
    rl         supervised warm-up, then GRPO and rejection-sampling fine-tuning
    tts        a small policy with test-time search vs a larger one answering greedily
    exchange   policies of several sizes x strategies: accuracy against FLOPs; the planner
    scratchpad worked against answer-only demonstrations at equal training and inference FLOPs
    law2       epochs: repeated vs fresh data; group: GRPO accuracy vs group size
    moe        mixture of experts vs dense models at equal compute
    select     selective backprop vs full backprop, time to a target loss
    memory     long-context recall with and without the neural memory
    spike      a model converted to spiking feed-forward layers and fine-tuned
    real       a pretrained model (SmolLM2) through test-time search, RL, 4 bits and llama.cpp

``STUDIES`` names each study's options (a frozen dataclass: ``keenlm study NAME --help`` is
generated from it), the function that runs it, and its summary. From Python:

    from keenlm.studies import STUDIES, moe
    STUDIES["moe"].run("runs/moe", moe.Options(tokens=2_000_000, seeds=3))

The library never imports this package: studies use techniques, techniques do not know them.
"""
from keenlm.studies import (exchange, frontier, law2, memory, moe, ptq, real, rl, scratchpad,
                            select, spike, tts)
from keenlm.studies.common import Study

STUDIES: dict[str, Study] = {
    "frontier": Study(frontier.Options, frontier.run, frontier.summary),
    "ptq": Study(ptq.Options, ptq.run, ptq.summary),
    "rl": Study(rl.Options, rl.run, rl.summary),
    "tts": Study(tts.Options, tts.run, tts.summary),
    "exchange": Study(exchange.Options, exchange.run, exchange.summary),
    "scratchpad": Study(scratchpad.Options, scratchpad.run, scratchpad.summary),
    "epochs": Study(law2.EpochsOptions, law2.run_epochs, law2.epochs_summary),
    "group": Study(law2.GroupOptions, law2.run_group, law2.group_summary),
    "moe": Study(moe.Options, moe.run, moe.summary),
    "select": Study(select.Options, select.run, select.summary),
    "memory": Study(memory.Options, memory.run, memory.summary),
    "spike": Study(spike.Options, spike.run, spike.summary),
    "real": Study(real.Options, real.run, real.summary),
}

__all__ = ["STUDIES", "Study"]
