fn main() -> anyhow::Result<()> {
    env_logger::init();
    anyhow::bail!("the command line arrives with the control plane")
}
