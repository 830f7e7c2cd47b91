"""The `cpuft sft` job: the recipe (setup / train / finalize) and the pieces it wires together
(trainer arguments from the plan, PEFT adapter configs, callbacks, the run summary).
"""
