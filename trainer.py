"""Train a siamese face-verification net on the raw LFW photos (dataset/images).

Edit the hyperparameters below, or override any of them: python trainer.py --epochs=5 --lr=0.01
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
model = "koch"                 # koch (Koch et al. 2015), compact (small ResNet), resnext
pretrained = True              # resnext only: start from ImageNet weights (torchvision cache)
embedding_dim = 256            # compact only: embedding size
width = 0                      # koch, compact: first-stage channels (0: the model's own)
drop_layer4 = False            # resnext only: cut the last stage
head_hidden = 1024             # resnext only: hidden size of the MLP head
head_depth = 1                 # resnext only: layers in the MLP head
activation = "sigmoid"         # resnext head: sigmoid or relu
p = 0.0                        # dropout probability in the head
init = "koch"                  # init of new layers: default, kaiming, xavier, koch
channels_last = False          # NHWC memory format
torch_compile = True           # torch.compile the training step (faster: RECIPE.md's profile;
                               # the first steps compile); False: eager
# ---- loss
loss = "bce"                   # bce (the paper's), contrastive, triplet, arcface
distance = "l1"                # l1 (the paper's) or cosine
margin = 0.5                   # arcface angle margin, or contrastive/triplet distance margin
arc_scale = 32.0               # arcface logit scale
cos_margin = 0.0               # arcface: CosFace's cosine margin (margin=0 and 0.35: CosFace)
label_smoothing = 0.0          # arcface only
pairs_per_epoch = 0            # bce/contrastive: pairs drawn per epoch (0: 2 x training images)
per_person = 4                 # triplet: images per person in a batch
# ---- optimisation
optimizer = "adam"             # adam or sgd (with Nesterov momentum)
lr = 1e-4
momentum = 0.9
weight_decay = 0.0
epochs = 30
batch_size = 64
lr_scheduler_on = True
cos = True                     # cosine schedule to zero; False: step schedule (gamma, step_size)
gamma = 0.1                    # step schedule: lr factor every step_size epochs
step_size = 10
warmup_epochs = 1              # linear warm-up
ema = 0.0                      # >0: evaluate and save an exponential moving average of weights
mixed_precision = True         # fp16 on CUDA, bf16 on CPU (2x faster here: AMX)
# ---- evaluation, stopping, run
calc_metrics_interval = 1      # evaluate every N epochs
early_stopping_metric = "accuracy"  # accuracy, precision, recall, f1, auc or loss
patience = 10                  # evaluations without improvement before stopping
max_minutes = 30.0             # wall-clock training budget (0: none); ends with an evaluation; the
                               # epoch it cuts short counts, and --resume starts the next one
snapshot_minutes = ""          # e.g. "5,10,20": also save snapshot_<m>min.pt at those minutes
seed = 0
device = "auto"                # auto, cpu, cuda
threads = 0                    # CPU threads (0: the free cores)
run_name = ""                  # logs/<run_name>/ (empty: model-loss-date)
resume = ""                    # logs/<run> to continue

if __name__ == "__main__":
    import sys
    import training
    sys.exit(training.main(globals()))
