"""Train a siamese face-verification net on the raw LFW photos (dataset/images): the paper's
recipe (Koch et al. 2015). trainer2.py changes what differs for face crops.

Edit the hyperparameters below, or override any of them: python trainer.py --epochs=5 --lr=0.01
Each backbone's and loss's own settings (embedding_dim, width, p, arc_margin, triplet_margin,
...) have their defaults in backbones.py and losses.py; set them here or as --name=value.
`python trainer.py --help` lists every name with its value and meaning.
Multi-GPU/CPU: torchrun --nproc_per_node=2 trainer.py. Resume: --resume=logs/<run>.
"""
# ---- data
data_dir = "dataset/images"    # <person>/<image>.jpg photos from download_data.py
protocol_dir = "dataset"       # where download_data.py put pairs*.txt and people*.txt
split = "view1"                # view1 (train DevTrain people), view2 (fold below), random
fold = 0                       # view2 only: the people.txt fold held out for testing
slice_of_data = 0              # >0: train on this many people, drawn at random with the seed
val_fraction = 0.1             # share of training people held out for validation pairs
val_pairs = 1000               # fixed validation pairs (half same, half different)
image_size = 105               # input side in pixels: the paper's 105 (photos are resized)
cache_images = True            # decode every image once and keep it in memory
augment_p = 0.5                # probability of the random crop and of the colour jitter
erase_p = 0.0                  # probability of erasing a rectangle (2-20% of the face)
num_workers = 0                # DataLoader worker processes (0: in the training process)
batch_augment = True           # augment whole uint8 batches on the device (False: image by image)
# ---- model
model = "koch"                 # a backbone of backbones.py: koch (Koch et al. 2015),
                               # compact, resnext, efficientnet_lite0 or timm (timm_model)
pretrained = True              # backbones with outside weights (resnext, efficientnet_lite0,
                               # timm) start from them
init = "koch"                  # init of new layers: default, kaiming, xavier, koch
channels_last = False          # NHWC memory format
torch_compile = True           # torch.compile the training step (faster: RECIPE.md's profile;
                               # the first steps compile); False: eager
# ---- loss
loss = "bce"                   # a loss of losses.py: bce (the paper's), contrastive,
                               # triplet or arcface
distance = "l1"                # l1 (the paper's) or cosine
# ---- optimisation
optimizer = "adam"             # adam or sgd (with Nesterov momentum)
lr = 1e-4                      # base learning rate (the schedule below scales it)
pretrained_lr = 1.0            # lr multiplier of the weights that came pretrained (1: lr)
momentum = 0.9                 # sgd only
weight_decay = 0.0             # L2 penalty on every parameter
epochs = 30                    # passes over the training data (max_minutes may end it first)
batch_size = 64                # images (or pairs) per step, over all processes
lr_scheduler_on = True         # False: a constant lr after the warm-up
cos = True                     # cosine schedule to zero; False: step schedule (gamma, step_size)
lr_cycles = 1                  # cosine only: >1 restarts it, that many cycles over the run; with
                               # snapshot_minutes at the cycles' ends, a snapshot ensemble (ensemble.py)
gamma = 0.1                    # step schedule: lr factor every step_size epochs
step_size = 10                 # step schedule: epochs between lr drops
warmup_epochs = 1              # linear warm-up
ema = 0.0                      # >0: evaluate and save an exponential moving average of weights
mixed_precision = True         # fp16 on CUDA, bf16 on CPU (faster here: AVX-512 BF16)
# ---- evaluation, stopping, run
calc_metrics_interval = 1      # evaluate every N epochs
early_stopping_metric = "accuracy"  # accuracy, precision, recall, f1, auc or loss
patience = 10                  # evaluations without improvement before stopping
max_minutes = 30.0             # wall-clock training budget (0: none); ends with an evaluation; the
                               # epoch it cuts short counts, and --resume starts the next one
snapshot_minutes = ""          # e.g. "5,10,20": also save snapshot_<m>min.pt at those minutes
seed = 0                       # people split, pairs, initialisation and data order
member_seed = 0                # >0: another initialisation and data order on the same people
                               # split (the members of an ensemble, ensemble.py)
device = "auto"                # auto, cpu, cuda
threads = 0                    # CPU threads (0: the free cores)
run_name = ""                  # logs/<run_name>/ (empty: model-loss-date)
resume = ""                    # logs/<run> to continue

if __name__ == "__main__":
    import sys
    import training
    sys.exit(training.main(globals()))
