fn main() {
    for (n, y) in weft_api::crds_yaml().unwrap() {
        println!("=== {n}\n{y}");
    }
}
