"""What the tests run against, real components only: the multi-rank launcher with fault injection
(rank_launcher.py, on train.launch.local), the 2-node SLURM cluster, data and evaluation fixtures, ingestion
helpers, and setup_system.sh. The SeaweedFS S3 server and the digits dataset live in benchmarks/ (s3_server.py,
digits.py), which the loader and trainer benchmarks use too: benchmarks never import tests."""
