"""Adapters: the only modules that import SDKs (requests, boto3, pymysql)."""
