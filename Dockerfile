# accel_trainer on a CUDA-enabled PyTorch image. The entrypoint is `accelerate launch`, so
# the arguments after the image name are accelerate launch's:
#   docker build -t accel-trainer .
#   docker run --gpus all --ipc=host -v "$PWD/runs:/workspace/runs" accel-trainer
#   docker run --gpus all --ipc=host -v "$PWD/runs:/workspace/runs" -e WANDB_API_KEY accel-trainer \
#       --config_file launch/multi_gpu.yaml --num_processes 8 launch/train.py \
#       --config configs/digits_gan.yaml --trainer.log_with wandb
FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

# PET_SIGNALS_TO_HANDLE: torchrun forwards SIGUSR1 to the ranks too (a preemption signal),
# instead of dying of it and leaving the ranks unsupervised.
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1

WORKDIR /workspace

# The base image's torch (with CUDA) satisfies the torch requirement, so pip keeps it.
COPY pyproject.toml README.md ./
COPY accel_trainer ./accel_trainer
RUN pip install --no-cache-dir .

COPY configs ./configs
COPY launch ./launch

ENTRYPOINT ["accelerate", "launch"]
CMD ["launch/train.py", "--config", "configs/digits_gan.yaml"]
