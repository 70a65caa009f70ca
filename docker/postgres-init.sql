-- The postgres image runs this once, on an empty data volume, as POSTGRES_USER.
-- That user therefore owns both databases.
CREATE DATABASE optuna;
CREATE DATABASE mlflow;
