"""Domain package of the MNIST retraining pipeline.

Everything the launcher, the gate, the trainer, the server and the CLI must
agree on lives here. That is the S3 key layout (`keys`), the dataset format
(`dataset`), the run record and ``train_meta.json`` schemas (`records`),
settings (`settings`), the instance tags (`instances`) and the errors
(`exceptions`). The modules the Lambda functions import use only the
standard library and boto3.
"""

__version__ = "0.1.0"
