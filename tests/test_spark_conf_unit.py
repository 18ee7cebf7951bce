"""The Spark session's driver options: the parallel collector for a local driver, added to what the user configured
rather than replacing it (a builder setting replaces the spark-defaults.conf one)."""

from __future__ import annotations

import pytest

from stores.spark_cluster import driver_conf, executor_conf

pytestmark = pytest.mark.unit
KEY = "spark.driver.extraJavaOptions"


def conf_dir(tmp_path, text: str) -> dict[str, str]:
    (tmp_path / "spark-defaults.conf").write_text(text)
    return {"SPARK_CONF_DIR": str(tmp_path)}


def test_a_local_driver_without_user_settings_gets_the_parallel_collector(tmp_path):
    assert driver_conf("local[2]", {}) == {KEY: "-XX:+UseParallelGC"}
    assert driver_conf("local[*]", {"SPARK_CONF_DIR": str(tmp_path / "none")}) == {KEY: "-XX:+UseParallelGC"}


def test_the_users_driver_options_are_kept(tmp_path):
    env = conf_dir(tmp_path, "# site settings\nspark.driver.memory 2g\n"
                             "spark.driver.extraJavaOptions   -Dlog4j.configuration=file:/etc/l4j -Xss4m\n")
    assert driver_conf("local[2]", env) == {KEY: "-Dlog4j.configuration=file:/etc/l4j -Xss4m -XX:+UseParallelGC"}


@pytest.mark.parametrize("line", ["spark.driver.extraJavaOptions -XX:+UseG1GC -Dx=1",
                                  "spark.driver.defaultJavaOptions -XX:+UseZGC",
                                  "spark.driver.extraJavaOptions\t-XX:+UseSerialGC"])
def test_a_collector_the_user_chose_is_left_alone(tmp_path, line):
    """Two collectors stop the JVM from starting ("multiple garbage collectors selected")."""
    assert driver_conf("local[2]", conf_dir(tmp_path, line + "\n")) == {}


def test_spark_home_conf_is_read_when_no_conf_dir_is_set(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "spark-defaults.conf").write_text("spark.driver.extraJavaOptions -Da=b\n")
    assert driver_conf("local[2]", {"SPARK_HOME": str(tmp_path)}) == {KEY: "-Da=b -XX:+UseParallelGC"}


def test_the_environment_variable_replaces_everything(tmp_path):
    env = {**conf_dir(tmp_path, "spark.driver.extraJavaOptions -XX:+UseG1GC\n"),
           "VELOCITY_SPARK_DRIVER_JAVA_OPTIONS": "-XX:+UseSerialGC -Dq=1"}
    assert driver_conf("spark://h:7077", env) == {KEY: "-XX:+UseSerialGC -Dq=1"}
    assert driver_conf("local[2]", env) == {KEY: "-XX:+UseSerialGC -Dq=1"}


@pytest.mark.parametrize("master", ["spark://h:7077", "local-cluster[2,1,1024]", "yarn", "k8s://https://k:443"])
def test_a_cluster_driver_gets_no_collector_from_velocity(master):
    """Its tasks run in executors; its options stay the cluster's."""
    assert driver_conf(master, {}) == {}
    assert executor_conf(master, {})["spark.task.maxFailures"] == "8"


def test_a_local_master_broadcasts_tables_up_to_256_mb_and_lists_files_itself(tmp_path):
    from stores.spark_cluster import local_conf

    ours = {"spark.sql.autoBroadcastJoinThreshold": "256m",
            "spark.sql.sources.parallelPartitionDiscovery.threshold": "100000"}
    assert local_conf("local[2]", {}) == ours
    assert local_conf("spark://h:7077", {}) == {}
    assert local_conf("local-cluster[2,1,1024]", {}) == {}
    mine = conf_dir(tmp_path, "spark.sql.autoBroadcastJoinThreshold -1\n")
    assert local_conf("local[2]", mine) == {  # the user's choice stays (spark-defaults.conf)
        "spark.sql.sources.parallelPartitionDiscovery.threshold": "100000"}


@pytest.mark.parametrize("line", ["spark.driver.extraJavaOptions=-XX:+UseG1GC", "spark.driver.extraJavaOptions: -XX:+UseG1GC",
                                  "  spark.driver.extraJavaOptions = -XX:+UseG1GC  "])
def test_every_properties_separator_is_read(tmp_path, line):
    """spark-submit reads the file as Java properties: `=` and `:` separate a key too."""
    assert driver_conf("local[2]", conf_dir(tmp_path, f"! a comment\n{line}\n")) == {}


def test_an_unreadable_or_odd_defaults_file_is_no_error(tmp_path):
    (tmp_path / "spark-defaults.conf").write_bytes(b"\xff\xfe garbage \x00\nspark.driver.extraJavaOptions -Dk=\xe9\n")
    assert driver_conf("local[2]", {"SPARK_CONF_DIR": str(tmp_path)}) == {
        "spark.driver.extraJavaOptions": "-Dk=\ufffd -XX:+UseParallelGC"}
    (tmp_path / "spark-defaults.conf").unlink()
    (tmp_path / "spark-defaults.conf").mkdir()  # a folder where the file should be
    assert driver_conf("local[2]", {"SPARK_CONF_DIR": str(tmp_path)}) == {KEY: "-XX:+UseParallelGC"}
