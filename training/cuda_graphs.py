"""CUDA graphs for train.py's step: on a GPU a decoder's step is bound by launching kernels, not by running them.

A step's gather, forward, loss, backward and gradient clipping (hundreds of small kernels per
caption word) are captured once per caption length (rounded up to a multiple of 4) and replayed as
one launch. The fused AdamW update stays outside the graph, so the learning-rate schedule,
checkpoints and --resume work exactly as in an eager step. What graphs saved, and how closely
graphed and eager losses agree, is measured in docs/speed.md.

    graphed = graphed_step(setup, inputs, image_index, tokens, lengths)   # setup: a training.steps.TrainingSetup
    loss = graphed(rows, longest)   # rows: caption indices [batch_size] on the GPU; then optimizer.step()

training.steps.cross_entropy_step replays it. graphed_step gives None where graphs do not apply (see
graphs_apply): the steps then run eagerly. A short last batch runs eagerly, and so does everything if a
capture fails.
"""
import torch

from utils import warn

LENGTH_STEP = 4     # captured lengths are rounded up to a multiple of this: fewer graphs, each with its own memory
WARMUP_STEPS = 3    # eager steps on a side stream before the first capture, as torch.cuda.graph asks


def graphs_apply(config, device, world: int, scaler, streamed: bool = False) -> bool:
    """Whether train.cuda_graphs captures this run's steps: one CUDA process, no torch.compile, a frozen CNN
    whose features are all on the GPU (not streamed), and bf16 or fp32 (fp16's GradScaler reads values back
    from the GPU, which a graph cannot)."""
    t = config.train
    return (t.cuda_graphs and device.type == "cuda" and world == 1 and not t.compile
            and not t.fine_tune_encoder and scaler is None and not streamed)


def graphed_step(setup, inputs, image_index, tokens, lengths):
    """A GraphedStep of setup's model (a training.steps.TrainingSetup) over these captions (arguments as
    GraphedStep's), or None where graphs do not apply: image_index None means the features are streamed
    batch by batch."""
    o = setup.optimization
    if not graphs_apply(setup.config, tokens.device, setup.world, o.scaler, streamed=image_index is None):
        return None
    return GraphedStep(setup.model, o.decoder_params, inputs, image_index, tokens, lengths, setup.config)


class GraphedStep:
    """Everything of a training step but the optimizer's update, as one CUDA graph per padded length.

    inputs [N_images, ...], image_index [N_captions], tokens [N_captions, L] live on the GPU; lengths
    [N_captions] (tokens per caption) may be on the CPU. Each graph reads its batch's caption rows
    from a static tensor. The gradients are the same tensors for every graph, zeroed inside it.
    """

    def __init__(self, model, params: list, inputs, image_index, tokens, lengths, config):
        self.model, self.params, self.config = model, params, config
        self.inputs, self.image_index, self.tokens = inputs, image_index, tokens
        self.lengths = lengths.to(tokens.device)       # the graph reads each row's length on the device
        self.grads = [torch.zeros_like(p) for p in params]
        # As training.optimization.make_amp: bf16 on CUDA (fp16 is excluded), none elsewhere. A graph cannot keep
        # autocast's cache.
        self.amp = torch.autocast(tokens.device.type, dtype=torch.bfloat16,
                                  enabled=config.train.amp and tokens.is_cuda, cache_enabled=False)
        self.graphs = {}                               # padded length -> (graph, its rows [B], its loss [])
        self.failed = False

    def step(self, rows, length: int):
        """Gather, forward, loss, backward and clipping for caption rows [B] cut to `length` tokens (at least the
        longest one's) -> the loss, detached. Eager; captured by __call__. Divides by the batch's target-token
        count, as train.py does in one process; padding past the longest caption changes no valid value."""
        for p, grad in zip(self.params, self.grads):
            p.grad = grad
        torch._foreach_zero_(self.grads)
        with self.amp:
            loss, extra = self.model(self.inputs[self.image_index[rows]], self.tokens[rows, :length],
                                     self.lengths[rows], self.config.train.label_smoothing)
        (loss + extra).backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.config.train.grad_clip)
        return loss.detach()

    def __call__(self, rows, longest: int):
        """One step on caption rows [B] (on the GPU) whose longest caption has `longest` tokens: the graph for
        its padded length (captured on first use) is replayed. -> the loss on the GPU (the graph's output,
        valid until its next replay), or None when capturing failed and the caller must step eagerly."""
        if self.failed:
            return None
        length = min(-(-longest // LENGTH_STEP) * LENGTH_STEP, self.tokens.size(1))
        if length not in self.graphs:
            try:
                self.graphs[length] = self._capture(rows, length)
            except RuntimeError as e:
                self.failed = True
                warn(f"CUDA graph capture failed ({str(e).splitlines()[0][:100]}); training without CUDA graphs "
                     f"(set train.cuda_graphs=false to skip trying)")
                return None
        graph, static_rows, loss = self.graphs[length]
        static_rows.copy_(rows)
        graph.replay()
        for p, grad in zip(self.params, self.grads):    # an eager step in between may have replaced them
            p.grad = grad
        return loss

    def _capture(self, rows, length: int):
        if not self.graphs:
            # Warm-up runs the lazy initialisations outside the capture; its BatchNorm updates are undone.
            buffers = [b.clone() for b in self.model.buffers()]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self.step(rows, length)
            torch.cuda.current_stream().wait_stream(side)
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers):
                    b.copy_(saved)
        static_rows = rows.clone()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the checkpoint and cache-writing threads may touch CUDA while this thread captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            loss = self.step(static_rows, length)
        return graph, static_rows, loss
