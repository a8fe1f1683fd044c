"""sbatch templates, the job body (job.sh, env.sh) and `senseflow slurm` (launch.py); see README.md here."""
