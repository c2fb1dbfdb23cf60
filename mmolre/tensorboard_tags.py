"""The groups of this trainer's TensorBoard tags (a tag's part before its first '/').

TensorBoard lists the groups alphabetically, and the tags inside a group too (its Time Series and Scalars
tabs). These names put the training losses and the validation metrics first (the validation metrics alone in
their group), then the end-of-run numbers, the fusion's modality weights, the many per-layer `moe/` and
`routing/` cards (up to hundreds), and the schedule and throughput (`train/`).
"""
LOSSES = "loss"                       # the step's training losses
METRICS = "metrics"
VALID = f"{METRICS}/valid"            # every validation metric, after each epoch
FINAL = f"{METRICS}_final"            # the HParams tab's metrics: valid loss at the selected epoch, test
TEST = f"{METRICS}_test"              # the test split, once at the end
MODALITY_WEIGHTS = "modality_weight"  # the fusion's mean weight per task and modality
MOE = "moe"                           # per MoE layer and task: aux loss, entropy, loads, drops
ROUTING = "routing"                   # after each epoch: specialisation (valid routes), dead experts and load (train)
TRAIN = "train"                       # learning rates, samples, samples/s, gradient norm, epoch
EPOCH_SECONDS = f"{TRAIN}/epoch_seconds"   # after each epoch: its training, validation and checkpoint seconds

ORDER = (LOSSES, METRICS, FINAL, TEST, MODALITY_WEIGHTS, MOE, ROUTING, TRAIN)   # as TensorBoard shows them
