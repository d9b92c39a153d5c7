"""Defaults shared by every config; each dataset config overrides only what differs.

Every number of a run lives in its config. Sections: `data` (its fields and defaults: rd_keras.defaults.DATA),
`model`, `teacher`, `distill`, `train`. Config files import it as `rd_keras.configs.common` (in a checkout,
`configs.common` re-exports it for config files of your own).
"""

import ml_collections

from rd_keras import defaults


def get_config():
    config = ml_collections.ConfigDict()
    config.data = defaults.data_config()

    config.model = ml_collections.ConfigDict({
        "arch": "resnet20",  # a key of rd_keras.architectures.SPECS, or resnet<6n+2>
        "width": 1.0,  # channel multiplier
        "stem": "",  # "" = the architecture's own stem; "cifar" or "imagenet"
        "student_shortcuts": "none",  # the RD student: "none" (plain) or "downsample" (projections kept)
        "supervised_shortcuts": "all",  # train.mode="supervised": "all" = ResNet, "none" = plain baseline
        "dirac": False,  # Dirac-parameterised convs in the plain net (folded away at export)
        "dirac_beta": 1.0,  # initial b of W = a*I + b*V (a starts at 1); small = start near identity mappings
        # RD: "random" or "teacher" (start the plain net from the teacher's weights, all but the projection
        # shortcuts; with teacher.mode="joint" that teacher is freshly initialised, so it matters mostly
        # with a pretrained one)
        "student_init": "random",
    })

    config.teacher = ml_collections.ConfigDict({
        "mode": "joint",  # "joint": trained alongside on its own CE; "pretrained": loaded, frozen
        # joint only: "together" (teacher and student from one forward pass) or "teacher_first" (the teacher
        # is updated first and the student learns through the updated teacher, as the official code)
        "joint_update": "together",
        "path": "",  # pretrained: a .keras file, a workdir, a checkpoint prefix, or keras.applications.ResNet50
        # (also ResNet101, ResNet152), which needs:
        "weights": "",  # "imagenet" (downloaded by Keras) or a local .h5 / .weights.h5 file of that net
    })

    config.distill = ml_collections.ConfigDict({
        "blend_floor": 0.0,  # m(t) decays by cosine from 1 to this ...
        "blend_epochs": 100.0,  # ... over this many epochs, then stays there
        "blend_start_epochs": 0.0,  # m(t) = 0 for this many epochs first (a joint teacher: no KD either)
        "kd_alpha": 0.0,  # weight of the T^2-scaled KL(teacher || hybrid) terms; 0 = no KD
        "logit_kd_alpha": 0.0,  # weight of T^2 KL(teacher || plain) on the plain net's own logits (plain KD)
        "temperature": 4.0,
        "normalize": False,  # divide the CE terms by the number of paths (hybrid + plain), as the official code
        # where hybrid paths start: "stages", "every_k_blocks:K", "b1,b2,..." or "none" (KD baseline)
        "hybrid_points": "stages",
        # "direct" (the paper) or "rescale": plain features scaled per channel to the teacher's RMS at the point
        "hybrid_entry": "direct",
        # > 0: the plain student's gradient (the whole batch's, all replicas) scaled down to this global norm
        # when larger; a teacher, joint or trained first, is not clipped
        "global_clipnorm": 0.0,
        # > 1: the same, at this multiple of the running mean of the norm (catches a spike's sudden jump at
        # any depth or width); with both set, the smaller cap holds
        "relative_clipnorm": 0.0,
    })

    config.train = ml_collections.ConfigDict({
        "mode": "distill",  # "distill" (RD) or "supervised" (one net, model.supervised_shortcuts)
        "epochs": 200,
        "lr": defaults.LR,  # for the global batch size data.batch_size
        "warmup_epochs": 1.0,  # linear warm-up, then cosine decay to 0
        "momentum": defaults.MOMENTUM,
        "nesterov": defaults.NESTEROV,
        "weight_decay": defaults.WEIGHT_DECAY,  # L2: loss += weight_decay/2 * sum ||kernel||^2 (PyTorch SGD)
        "seed": 0,
        "deterministic": False,  # tf.config.experimental.enable_op_determinism()
        "precision": "float32",  # or "mixed_float16" (loss-scaled) or "mixed_bfloat16" (CPUs with AVX512_BF16)
        "jit_compile": False,  # XLA for forward+backward; slower on CPU
        "strategy": "auto",  # auto | default | mirrored | multi_worker
        "nan_policy": "stop",  # "stop": fail naming the step and term; "skip": drop that update
        "log_every_steps": 50,
        "checkpoint_every_steps": 1000,  # and at every epoch end
        "keep_checkpoints": 3,
        "steps_per_run": 0,  # >0: stop (with a checkpoint) after this many steps; rerun to continue
        "progress": True,  # tqdm bar per epoch
        "grad_norms": True,  # per-stage gradient norms (plain vs hybrid terms) in TensorBoard, at log points
    })

    # train.mode="transfer": fine-tune a trained net on this config's data (rd_keras.transfer)
    config.transfer = ml_collections.ConfigDict({
        # a plain.keras or resnet.keras file, a workdir (its plain.keras, else resnet.keras), or
        # keras.applications.<Name> (converted by rd_keras.pretrained)
        "from": "",
        "weights": "imagenet",  # keras.applications sources only: "imagenet" or a local .h5 / .weights.h5 file
        "freeze_stages": 0,  # leading stages kept frozen, stem included (1 = the stem); their BN in inference mode
    })

    config.export = ml_collections.ConfigDict({
        "enabled": False,  # at the end of training, export plain.keras (python -m rd_keras.export does the same)
        "formats": "saved_model,tflite",
        "quantize": "none,int8",  # TFLite variants: none, fp16, dynamic, int8 (or "all")
        "qat_steps": 0,  # > 0: also a quantisation-aware fine-tune, giving plain_qat.tflite
        "model_name": defaults.MODEL_NAME,  # TF Serving model name
        "eval_examples": defaults.EVAL_EXAMPLES,  # test images for the accuracy report of every artefact
    })
    return config


def smoke(config):
    """Shrinks `config` in place to a run of a few dozen steps on a small subset (< 1 min on 2 CPU cores)."""
    config.model.arch = "resnet8"
    config.model.width = 0.25
    config.data.batch_size = 32
    config.data.train_subset = 384
    config.data.eval_subset = 256
    config.data.shuffle_buffer = 512
    config.train.epochs = 2
    config.train.warmup_epochs = 0.5
    config.train.log_every_steps = 4
    config.train.checkpoint_every_steps = 8
    config.distill.blend_epochs = 1.5
    config.distill.blend_floor = 0.1
    config.distill.kd_alpha = 0.5  # exercise every loss term
    # One phase, the teacher trained alongside, plain convs: a smoke run checks the plumbing of every net and
    # loss term in seconds, whatever the config's recipe. The recipe's two phases are the same code twice
    # (tests run them).
    config.teacher.mode = "joint"
    config.teacher.path = ""
    config.teacher.weights = ""
    config.model.dirac = False
    config.distill.logit_kd_alpha = 0.0
    return config


def recipe(config):
    """The default recipe, chosen on Fashion-MNIST validation splits (docs/results.md): a pretrained, frozen
    teacher (with no teacher.path, trained first in W/teacher: one command, two phases), Dirac convs that
    start near identity mappings, hybrid losses at full weight to the end (m(t) = 1), KD on the plain logits
    (RD + KD was the best on validation at depth 56, ahead of RD alone and of KD alone), the plain
    features rescaled per channel to the teacher's size where they enter its tails, and the student's
    gradient clipped at 3x its running norm. Without the rescaling the hybrid paths hurt at depth 110 (one
    seed of three collapsed); with it RD + KD beat KD there on every seed, and at depth 20 it changed
    nothing measurable. Without a clip one depth-56 seed of three took a loss spike near the peak learning
    rate and ended 2.8 points short. A fixed clip norm of 2 removed it but bound on nearly every warm-up
    step (the ordinary norm is 3-6) and cost depth 110 half a point; the relative cap clips only the
    spikes (1-2 steps of a run, none on most seeds)."""
    config.teacher.mode = "pretrained"
    config.teacher.path = ""
    config.model.dirac = True
    config.model.dirac_beta = 0.1
    config.distill.blend_floor = 1.0
    config.distill.logit_kd_alpha = 1.0
    config.distill.hybrid_entry = "rescale"
    config.distill.relative_clipnorm = 3.0
    return config


def cifar(name, arg=None):
    """CIFAR-10/100 from tfds: ResNet-56 teacher, plain-56 student, pad-crop + flip, 200 epochs."""
    config = get_config()
    config.data.source = "tfds"
    config.data.name = name
    # The data set's own statistics, whatever the source (tfds knows them by name, a folder does not).
    config.data.mean, config.data.std = defaults.CIFAR_STATS[name]
    config.data.data_dir = ""  # the tfds default (~/tensorflow_datasets or $TFDS_DATA_DIR)
    config.data.download = False
    config.data.augment = "cifar"  # pad 4 + random 32x32 crop + flip
    config.model.arch = "resnet56"
    config.data.batch_size = 128
    config.train.lr = 0.1
    config.train.epochs = 200
    config.train.weight_decay = 5e-4
    config.distill.blend_epochs = 150.0
    recipe(config)
    if arg == "smoke":
        smoke(config)
    elif arg is not None:
        raise ValueError(f"Unknown config variant {arg!r}: expected 'smoke' or none.")
    return config
