#!/bin/bash
# Submit the jobs in order; a job waits for those it depends on.
set -euo pipefail
cd "$(dirname "$0")"
JOB_0=$(sbatch --parsable 00_ccp-train-face-textual-inversion.sbatch)
echo "ccp-train-face-textual-inversion: $JOB_0"
JOB_1=$(sbatch --parsable 01_ccp-train-face-dreambooth.sbatch)
echo "ccp-train-face-dreambooth: $JOB_1"
JOB_2=$(sbatch --parsable 02_ccp-train-face-custom-diffusion.sbatch)
echo "ccp-train-face-custom-diffusion: $JOB_2"
JOB_3=$(sbatch --parsable 03_ccp-train-face-oft.sbatch)
echo "ccp-train-face-oft: $JOB_3"
JOB_4=$(sbatch --parsable 04_ccp-train-face-ours.sbatch)
echo "ccp-train-face-ours: $JOB_4"
JOB_5=$(sbatch --parsable 05_ccp-train-animal-textual-inversion.sbatch)
echo "ccp-train-animal-textual-inversion: $JOB_5"
JOB_6=$(sbatch --parsable 06_ccp-train-animal-dreambooth.sbatch)
echo "ccp-train-animal-dreambooth: $JOB_6"
JOB_7=$(sbatch --parsable 07_ccp-train-animal-custom-diffusion.sbatch)
echo "ccp-train-animal-custom-diffusion: $JOB_7"
JOB_8=$(sbatch --parsable 08_ccp-train-animal-oft.sbatch)
echo "ccp-train-animal-oft: $JOB_8"
JOB_9=$(sbatch --parsable 09_ccp-train-animal-ours.sbatch)
echo "ccp-train-animal-ours: $JOB_9"
JOB_10=$(sbatch --parsable --dependency=afterok:$JOB_0:$JOB_1:$JOB_2:$JOB_3:$JOB_4:$JOB_5:$JOB_6:$JOB_7:$JOB_8:$JOB_9 10_ccp-reproduce-full.sbatch)
echo "ccp-reproduce-full: $JOB_10"
